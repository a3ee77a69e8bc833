"""`personaplex-fast offline` end to end on a tiny checkpoint, as a user runs it."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf



@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """espeak-ng speech as a 44.1 kHz stereo wav (the codec and CLI must take any rate/layout)."""
    import soxr

    d = tmp_path_factory.mktemp("speech")
    subprocess.run(["espeak-ng", "-w", str(d / "s.wav"), "Hello, I would like to book a table "
                    "for two people tonight, please."], check=True)
    pcm, sr = sf.read(d / "s.wav", dtype="float32")
    pcm = soxr.resample(pcm, sr, 44100)
    sf.write(d / "s44.wav", np.stack([pcm, 0.5 * pcm], axis=1), 44100)
    return d / "s44.wav"


def offline(tiny, wav, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "personaplex_fast.cli", "offline", "--model", str(tiny),
         "--input-wav", str(wav), "--output-wav", str(out / "o.wav"),
         "--output-text", str(out / "o.json"), *extra],
        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("voice", [None, "NATF0", "NATM1.wav", "custom"])
def test_offline_keeps_duration_and_writes_a_transcript(tiny, speech, tmp_path, voice):
    extra = ["--seed", "3", "--text-prompt", "You enjoy having a good conversation."]
    if voice == "custom":
        extra += ["--voice-prompt", str(speech)]
    elif voice == "NATM1.wav":  # a packaged voice given as audio
        import tarfile

        with tarfile.open(tiny / "voices.tgz") as tar:
            tar.extract("voices/NATM1.wav", tmp_path, filter="data")
        extra += ["--voice-prompt", str(tmp_path / "voices" / "NATM1.wav")]
    elif voice:
        extra += ["--voice-prompt", voice]
    proc = offline(tiny, speech, tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr
    info_in, info_out = sf.info(speech), sf.info(tmp_path / "o.wav")
    assert info_out.samplerate == 24000 and info_out.channels == 1
    assert info_out.frames == round(info_in.frames * 24000 / 44100)
    out, _ = sf.read(tmp_path / "o.wav")
    assert np.abs(out).max() > 1e-3  # the model spoke
    # After a prompt the first 80 ms frame is already the model's audio: the prompt's last
    # step produced its codes (README: the output wav keeps the input's timeline).
    assert np.abs(out[:1920]).max() > 1e-3
    assert re.search(r"real-time factor \d+\.\d\d \(\d+\.\dx real time\)", proc.stdout), proc.stdout
    doc = json.loads((tmp_path / "o.json").read_text())
    frames = [t["frame"] for t in doc["tokens"]]
    assert frames == sorted(frames) and len(frames) > 10
    assert all(abs(t["time_s"] - t["frame"] * 0.08) < 1e-6 for t in doc["tokens"])


def test_without_a_prompt_the_first_frame_is_silence(tiny, speech, tmp_path):
    """The model's first frame comes before any of its audio exists: silence, kept so the
    output has the input's timeline; the next frames are its voice."""
    proc = offline(tiny, speech, tmp_path)
    assert proc.returncode == 0, proc.stderr
    out, _ = sf.read(tmp_path / "o.wav")
    assert np.abs(out[:1920]).max() == 0 and np.abs(out[1920:3840]).max() > 1e-3


def test_corrupt_input_exits_with_one_line(tiny, speech, tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(speech.read_bytes()[:1000])
    proc = offline(tiny, bad, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "bad.wav" in lines[0] and "Traceback" not in proc.stderr
    missing = offline(tiny, speech, tmp_path, "--voice-prompt", "NOPE9")
    assert missing.returncode == 2 and "NOPE9" in missing.stderr


def test_check_mode_reports_per_op_differences(tiny, speech, tmp_path):
    proc = offline(tiny, speech, tmp_path, "--check", "--greedy")
    assert proc.returncode == 0, proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith("check:")]
    for op in ("decoder_layers", "matvec", "conv1d_stream", "rvq_decode"):  # the decode step's ops
        assert any(op in l for l in lines), (op, lines)
    for line in lines:
        assert float(line.rsplit("=", 1)[1]) < 1e-3, line
