"""`chat` through a real PortAudio backend: a private PulseAudio daemon with virtual devices.

The daemon has two null sinks: `micfeed`, whose monitor is the default source (the
microphone: espeak-ng speech is played into it with paplay), and `speaker`, the
default sink (its monitor is recorded with parec to hear what the model said).
PortAudio reaches it through its ALSA host API and the ALSA 'pulse' plugin, exactly
as on a desktop. Needs apt packages pulseaudio, pulseaudio-utils, libportaudio2,
libasound2-plugins and espeak-ng (see .ci/run).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from personaplex_fast.chat import ChatStats, Resampler, Speaker
from personaplex_fast.tiny import make_tiny

CLI = [sys.executable, "-m", "personaplex_fast.cli", "chat"]
SPEECH = ("Hello, can you hear me? I would like to talk about the weather in the mountains, "
          "the rivers and the forests, and what we should cook for dinner tonight. "
          "Tell me about your day, and then we can plan the weekend together.")

DEFAULT_PA = """
load-module module-native-protocol-unix auth-anonymous=1 socket={socket}
load-module module-null-sink sink_name=speaker rate=24000 channels=1
load-module module-null-sink sink_name=micfeed rate=24000 channels=1
set-default-sink speaker
set-default-source micfeed.monitor
"""


@pytest.fixture(scope="module")
def pulse(tmp_path_factory):
    """Environment for children that talk to a fresh PulseAudio daemon (killed at the end)."""
    root = tmp_path_factory.mktemp("pulse")
    socket = root / "native"
    (root / "default.pa").write_text(DEFAULT_PA.format(socket=socket))
    env = {**os.environ, "HOME": str(root), "XDG_RUNTIME_DIR": str(root), "PULSE_RUNTIME_PATH": str(root),
           "PULSE_SERVER": f"unix:{socket}"}
    # -n: no default.pa but ours; --exit-idle-time=-1: stay up between tests.
    daemon = subprocess.Popen(
        ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "--system=false", "-n",
         "-F", str(root / "default.pa"), "--log-target=stderr"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode == 0:
                break
            if daemon.poll() is not None:
                pytest.fail(f"pulseaudio exited: {daemon.stderr.read()[-2000:]}")
            time.sleep(0.05)
        else:
            pytest.fail("pulseaudio did not answer within 5 s")
        yield env
    finally:
        daemon.terminate()
        try:
            daemon.wait(5)
        except subprocess.TimeoutExpired:
            daemon.kill()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"))  # with a tokenizer: the transcript is real text


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), SPEECH], check=True)
    return path


@pytest.fixture
def talking(pulse, speech):
    """Speech looped into the microphone while the test runs."""
    player = subprocess.Popen(["bash", "-c", f"while paplay -d micfeed {speech}; do :; done"],
                              env=pulse, start_new_session=True)
    yield
    os.killpg(player.pid, signal.SIGTERM)
    player.wait()


def _summary(stderr: str) -> dict[str, float]:
    line = next((ln for ln in stderr.splitlines() if ln.startswith("chat summary:")), None)
    assert line is not None, f"no summary line in stderr:\n{stderr}"
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+)", line)}


def test_live_conversation_through_pulseaudio(pulse, model, talking, tmp_path):
    recording = tmp_path / "speaker.wav"
    parec = subprocess.Popen(["parec", "-d", "speaker.monitor", "--rate=24000", "--channels=1",
                              "--format=s16le", "--file-format=wav", str(recording)], env=pulse)
    try:
        started = time.monotonic()
        run = subprocess.run(CLI + ["--model", str(model), "--seconds", "10",
                                    "--input-device", "pulse", "--output-device", "pulse"],
                             env=pulse, capture_output=True, text=True, timeout=60)
        elapsed = time.monotonic() - started
    finally:
        parec.send_signal(signal.SIGINT)  # parec finalizes the wav header on SIGINT
        parec.wait(5)
    print(run.stderr)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    stats = _summary(run.stderr)
    # --seconds counts microphone audio: exactly 125 frames of 80 ms, heard in real time.
    assert stats["frames"] == 125
    assert 9.5 < elapsed < 30
    for key in ("input_overflows", "input_dropped", "output_underflows", "output_underruns", "output_dropped"):
        assert key in stats
    # A 25 ms tick keeps up with 80 ms frames: nothing should be lost on an idle machine,
    # but a loaded CI box may glitch a few times (that is what the counters are for).
    assert stats["input_dropped"] + stats["output_underruns"] <= 10
    assert stats["input_peak"] > 0.05, "espeak-ng speech did not reach the microphone"
    assert len(run.stdout.strip()) > 0, "no transcript printed"

    audio, rate = sf.read(str(recording), dtype="float32")
    assert rate == 24000 and len(audio) > 9 * rate
    # The recording starts before the model loads; the (random) model then speaks
    # continuously, so most of its 10 s must be audible.
    frames = audio[: len(audio) // 1920 * 1920].reshape(-1, 1920)
    loud = np.sqrt(np.mean(frames ** 2, axis=1)) > 0.01
    assert loud.sum() * 0.08 > 7, f"only {loud.sum() * 0.08:.1f} s of the model's audio reached the speaker"


def test_ctrl_c_closes_cleanly(pulse, model, talking):
    proc = subprocess.Popen(CLI + ["--model", str(model)], env=pulse,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the streams are about to open
        if line.startswith("chat: microphone"):
            break
    # The first transcript piece: frames are flowing (a fresh PulseAudio monitor source
    # may take ~1 s to deliver its first samples).
    assert proc.stdout.read(1)
    time.sleep(2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode in (0, 130), err
    assert "Traceback" not in err
    assert _summary(err)["frames"] >= 20  # 2 s of 80 ms frames, and then some


def test_no_audio_device_is_one_line_error(model, tmp_path):
    # No sound server to reach: on a machine without sound hardware (CI) PortAudio then
    # really lists no device at all. (An ALSA_CONFIG_PATH without cards makes PortAudio 19.6 abort.)
    env = {**os.environ, "PULSE_SERVER": f"unix:{tmp_path}/nothing-here", "HOME": str(tmp_path)}
    listed = subprocess.run([sys.executable, "-c", "import sounddevice; print(len(sounddevice.query_devices()))"],
                            env=env, capture_output=True, text=True, timeout=30)
    if listed.stdout.strip() not in ("", "0"):
        pytest.skip(f"this host has sound hardware: PortAudio lists {listed.stdout.strip()} devices without a server")
    run = subprocess.run(CLI + ["--model", str(model), "--seconds", "1"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("personaplex-fast: error: no audio input device found"), lines


def test_unknown_device_is_one_line_error(pulse, model):
    run = subprocess.run(CLI + ["--model", str(model), "--input-device", "no such mic"], env=pulse,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "audio input device 'no such mic' not found" in lines[0], lines


def test_prompted_session(pulse, model, talking):
    # The PersonaPlex voice and text phases run before the microphone opens.
    run = subprocess.run(CLI + ["--model", str(model), "--seconds", "2", "--voice-prompt", "NATF0",
                                "--text-prompt", "You are a wise and friendly teacher."],
                         env=pulse, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert _summary(run.stderr)["frames"] == 25


def test_speaker_plays_silence_on_underrun_and_counts_it():
    stats = ChatStats()
    speaker = Speaker(stats, max_blocks=2)
    out = np.ones((1920, 1), np.float32)
    speaker.callback(out, 1920, None, _Status())
    assert not out.any() and stats.output_underruns == 0  # before the first frame: not an underrun
    speaker.push(np.full(1000, 0.5, np.float32))
    speaker.callback(out, 1920, None, _Status())
    assert (out[:1000] == 0.5).all() and not out[1000:].any() and stats.output_underruns == 1
    for _ in range(3):
        speaker.push(np.zeros(10, np.float32))
    assert stats.output_dropped == 1


def test_resampler_streams_device_rate_to_24k():
    to_model = Resampler(48000, 24000)
    tone = np.sin(2 * np.pi * 440 * np.arange(48000) / 48000).astype(np.float32)
    out = np.concatenate([to_model(tone[i:i + 3840]) for i in range(0, 48000, 3840)])
    assert 24000 - 1200 < len(out) <= 24000  # soxr holds back its filter delay (~30 ms) until the end
    assert abs(np.abs(out[2000:]).max() - 1.0) < 0.01


class _Status:
    input_overflow = output_underflow = False
