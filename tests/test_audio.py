"""Audio I/O: any rate and channel count in, 24 kHz float32 mono out; clear errors."""

import numpy as np
import pytest
import soundfile as sf

from personaplex_fast.audio import read_audio, write_wav
from personaplex_fast.errors import AudioError


def _stereo_tone(rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    return np.stack([left, 0.5 * left], axis=1).astype(np.float32)  # in phase: mean = 0.75 * left


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_44k1_stereo_becomes_24k_mono(tmp_path, fmt):
    path = tmp_path / f"tone.{fmt}"
    sf.write(str(path), _stereo_tone(44100, 1.5), 44100)
    pcm = read_audio(path)
    assert pcm.dtype == np.float32 and pcm.ndim == 1
    assert abs(len(pcm) - 36000) <= 1
    # soxr keeps a 440 Hz tone's amplitude (0.375 after the downmix) to well under 1%.
    assert abs(np.abs(pcm[2000:-2000]).max() - 0.375) < 0.005
    spectrum = np.abs(np.fft.rfft(pcm[:24000]))
    assert abs(np.argmax(spectrum) - 440) <= 1  # 1 Hz bins over one second


def test_six_channels_and_odd_rate(tmp_path):
    path = tmp_path / "surround.wav"
    sf.write(str(path), np.full((8000, 6), 0.25, np.float32), 8000)
    pcm = read_audio(path)
    assert len(pcm) == 24000 and np.allclose(pcm[100:-100], 0.25, atol=1e-3)


def test_write_then_read_round_trip(tmp_path):
    path = tmp_path / "out.wav"
    tone = _stereo_tone(24000, 0.5)[:, 0]
    write_wav(path, tone)
    assert sf.info(str(path)).samplerate == 24000
    assert np.abs(read_audio(path) - tone).max() < 1e-4  # 16-bit quantization


def _assert_one_line(error, path):
    message = str(error.value)
    assert "\n" not in message and str(path) in message, message


def test_truncated_wav_is_rejected(tmp_path):
    path = tmp_path / "cut.wav"
    sf.write(str(path), _stereo_tone(44100, 1.0), 44100, subtype="PCM_16")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # libsndfile alone would read half silently
    with pytest.raises(AudioError, match="truncated") as error:
        read_audio(path)
    _assert_one_line(error, path)


def test_truncated_flac_header_and_missing_files(tmp_path):
    path = tmp_path / "cut.flac"
    sf.write(str(path), _stereo_tone(44100, 1.0), 44100)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(AudioError) as error:
        read_audio(path)
    _assert_one_line(error, path)

    missing = tmp_path / "nowhere.wav"
    with pytest.raises(AudioError, match="does not exist") as error:
        read_audio(missing)
    _assert_one_line(error, missing)

    garbage = tmp_path / "text.wav"
    garbage.write_text("not audio at all")
    with pytest.raises(AudioError) as error:
        read_audio(garbage)
    _assert_one_line(error, garbage)


mp3_supported = "MP3" in sf.available_formats()


@pytest.mark.skipif(not mp3_supported, reason="this libsndfile build has no mp3 encoder")
def test_mp3_read_and_truncation(tmp_path):
    path = tmp_path / "tone.mp3"
    sf.write(str(path), _stereo_tone(44100, 2.0), 44100)
    pcm = read_audio(path)
    assert abs(len(pcm) - 48000) < 2400  # mp3 adds encoder delay / padding
    spectrum = np.abs(np.fft.rfft(pcm[:24000]))
    assert abs(np.argmax(spectrum) - 440) <= 1

    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated") as error:
        read_audio(path)
    _assert_one_line(error, path)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_a_file_longer_than_the_cap_is_refused_by_its_header(tmp_path, fmt, monkeypatch):
    path = tmp_path / f"long.{fmt}"
    sf.write(str(path), np.zeros((3 * 8000, 2), np.float32), 8000)
    assert len(read_audio(path, max_seconds=3)) == 3 * 24000
    # Refused from the header: nothing is decoded.
    monkeypatch.setattr(sf.SoundFile, "read", lambda *a, **k: pytest.fail("decoded a refused file"))
    with pytest.raises(AudioError, match=r"is 3\.0 s long; the limit is 2\.5 s") as e:
        read_audio(path, max_seconds=2.5)
    _assert_one_line(e, path)
