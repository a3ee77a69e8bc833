"""Audio file I/O: any wav/flac/mp3/ogg that libsndfile reads -> float32 mono at 24 kHz.

Decoding is libsndfile through `soundfile` (it reads mp3 from libsndfile 1.1 on; older
builds fall back to `sphn`). Channels are averaged to mono, then the rate is converted
with libsoxr (`soxr`, quality 'VHQ': linear phase, passband to ~0.91 of Nyquist, ~175 dB
stopband), which keeps resampling error far below the codec's own.

Every failure a user can cause (missing, unreadable, truncated or empty file) raises a
one-line `AudioError` that names the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import AudioError

SAMPLE_RATE = 24000

# libsndfile notes a WAV whose data chunk claims more bytes than the file holds as
# "data : 176400 (should be 88178)" and then silently reads what is there.
_SHORT_CHUNK = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Sizes that streaming writers put in a header they could not rewind to fill in.
_UNKNOWN_SIZES = {0, 0x7FFFFFFF, 0xFFFFFFFF}


def _decode(path: Path, max_seconds: float | None, limit: str) -> tuple[np.ndarray, int]:
    """-> samples [T, C] float32 and the file's rate; at most max_seconds + one sample
    are decoded (the caller refuses a longer file)."""
    try:
        info = sf.info(str(path))
        # A header may announce hours; refuse before decoding rather than after.
        _check_length(path, info.frames, info.samplerate, max_seconds, limit)
        limit = -1 if max_seconds is None else int(max_seconds * info.samplerate) + 1
        with sf.SoundFile(str(path)) as f:
            data = f.read(frames=limit, dtype="float32", always_2d=True)
        rate = info.samplerate
    except sf.LibsndfileError as e:
        if path.suffix.lower() != ".mp3" or "mp3" in str(sf.available_formats()).lower():
            raise AudioError(f"cannot decode audio file {path}: {e.error_string}") from None
        return _decode_with_sphn(path, max_seconds)
    match = _SHORT_CHUNK.search(info.extra_info or "")
    if match and int(match.group(1)) not in _UNKNOWN_SIZES and int(match.group(1)) > int(match.group(2)):
        raise AudioError(f"audio file {path} is truncated: its header announces "
                         f"{match.group(1)} bytes of samples, only {match.group(2)} are present")
    # Compressed streams (mp3) announce a length from their header; estimates of VBR files
    # without a Xing/LAME header may be a little off, hence the slack.
    if info.frames > 0 and info.frames - len(data) > max(4096, info.frames // 100):
        raise AudioError(f"audio file {path} is truncated: {len(data)} of {info.frames} "
                         "announced samples could be decoded")
    return data, rate


def _check_length(path: Path, frames: int, rate: int, max_seconds: float | None, limit: str) -> None:
    if max_seconds is not None and rate > 0 and frames > max_seconds * rate:
        raise AudioError(f"audio file {path} is {frames / rate:.1f} s long; the limit is "
                         f"{max_seconds:g} s{limit}")


def _decode_with_sphn(path: Path, max_seconds: float | None) -> tuple[np.ndarray, int]:
    import sphn  # only for libsndfile builds without mp3

    try:
        data, rate = sphn.read(str(path), duration_sec=None if max_seconds is None else max_seconds + 1)
    except Exception as e:
        raise AudioError(f"cannot decode audio file {path}: {e}") from None
    return np.ascontiguousarray(np.asarray(data, dtype=np.float32).T), int(rate)


def read_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, max_seconds: float | None = None,
               limit: str = "") -> np.ndarray:
    """Read an audio file as float32 mono [T] at `sample_rate`, downmixing and resampling.
    A file longer than `max_seconds` is refused (AudioError, ending with `limit`: what
    sets it) without being decoded past that length."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"audio file {path} does not exist or is not a regular file")
    data, rate = _decode(path, max_seconds, limit)
    if data.size == 0:
        raise AudioError(f"audio file {path} contains no samples")
    _check_length(path, len(data), rate, max_seconds, limit)
    mono = data.mean(axis=1, dtype=np.float32)
    if rate != sample_rate:
        mono = soxr.resample(mono, rate, sample_rate, quality="VHQ").astype(np.float32)
    return mono


def write_wav(path: str | Path, pcm, sample_rate: int = SAMPLE_RATE) -> None:
    """Write mono [T] (or [T, C]) float samples in [-1, 1] as a 16-bit PCM wav."""
    pcm = np.asarray(pcm, dtype=np.float32)
    try:
        sf.write(str(path), np.clip(pcm, -1.0, 1.0), sample_rate, subtype="PCM_16")
    except (sf.LibsndfileError, OSError) as e:
        raise AudioError(f"cannot write audio file {path}: {e}") from None
