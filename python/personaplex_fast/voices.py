"""Voice prompts: the packaged PersonaPlex voices, or any wav as a custom voice.

The model repo ships `voices.tgz` with one file per voice (NATF0-3, NATM0-3,
VARF0-4, VARM0-4): a `.pt` recording of the voice phase (the temporal
transformer's input embeddings and the token ring at its end, see prompts.py)
and/or the voice's audio. The archive is unpacked once, safely, and each `.pt`
is read with the torch-free restricted reader and cached as safetensors.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import torchfile
from .audio import SAMPLE_RATE, read_audio
from .errors import UserError
from .prompts import PackagedVoice

VOICE_NAMES = tuple([f"NATF{i}" for i in range(4)] + [f"NATM{i}" for i in range(4)]
                    + [f"VARF{i}" for i in range(5)] + [f"VARM{i}" for i in range(5)])
VOICES_ARCHIVE = "voices.tgz"
# PersonaPlex levels a voice prompt's audio to -24 LUFS before encoding it.
VOICE_LOUDNESS_LUFS = -24.0
# The recorded ring of a .pt voice is PersonaPlex's: max_delay + 3 positions.
_PT_RING = 4


@dataclass(frozen=True)
class AudioVoice:
    pcm: np.ndarray  # float32 mono at 24 kHz, loudness-normalized


Voice = AudioVoice | PackagedVoice


def cache_root() -> Path:
    base = os.environ.get("PERSONAPLEX_FAST_CACHE") or Path.home() / ".cache" / "personaplex_fast"
    return Path(base) / "voices"


def unpack(archive: Path) -> Path:
    """Extract voices.tgz into the cache (once per archive content); returns the folder."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
    dest = cache_root() / digest
    if (dest / ".complete").exists():
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = Path(member.name)
                if member.isdir():
                    continue
                if not member.isfile() or name.is_absolute() or ".." in name.parts:
                    raise UserError(f"{archive}: refusing unsafe archive member {member.name!r}")
                if name.suffix not in (".pt", ".wav") or name.name.startswith("._"):
                    continue  # "._x" are macOS resource forks, not voices
                data = tar.extractfile(member).read()
                (dest / name.name).write_bytes(data)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{archive}: cannot unpack voices ({e})") from None
    (dest / ".complete").write_text("")
    return dest


def list_voices(folder: Path) -> list[str]:
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".pt", ".wav", ".safetensors")})


def read_pt_voice(path: Path) -> PackagedVoice:
    """A PersonaPlex `.pt` voice: {"embeddings": [E, 1, 1, dim], "cache": [1, 17, 4]}."""
    obj = torchfile.load(path)
    if not isinstance(obj, dict) or "embeddings" not in obj or "cache" not in obj:
        raise UserError(f"{path}: not a PersonaPlex voice (needs 'embeddings' and 'cache')")
    emb = np.asarray(obj["embeddings"], dtype=np.float32)
    ring = np.asarray(obj["cache"])
    E = emb.shape[0]
    emb = emb.reshape(E, -1)
    if ring.ndim != 3 or ring.shape[0] != 1 or ring.shape[2] != _PT_RING:
        raise UserError(f"{path}: voice token cache has shape {ring.shape}, expected (1, 17, 4)")
    # PersonaPlex saved it at offset E + 1: positions E and E + 1 are the ones we need.
    tokens = np.stack([ring[0, :, (E + j) % _PT_RING] for j in (0, 1)]).astype(np.int64)
    return PackagedVoice(emb, tokens)


def _cached_pt(path: Path) -> PackagedVoice:
    from safetensors.numpy import load_file, save_file

    cached = path.with_suffix(".safetensors")
    in_cache = path.resolve().parent.is_relative_to(cache_root().resolve())
    if in_cache and cached.exists():
        d = load_file(str(cached))
        return PackagedVoice(d["embeddings"], d["ring_tokens"])
    voice = read_pt_voice(path)
    if in_cache:
        # Written aside and renamed: an interrupted write must not leave a bad cache.
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        save_file({"embeddings": voice.embeddings, "ring_tokens": voice.ring_tokens}, str(tmp))
        os.replace(tmp, cached)
    return voice


def audio_voice(path: Path) -> AudioVoice:
    import pyloudnorm

    pcm = read_audio(path).astype(np.float64)
    if len(pcm) < SAMPLE_RATE // 2:
        raise UserError(f"{path}: a voice prompt needs at least 0.5 s of audio")
    loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(pcm)
    if np.isfinite(loudness):
        pcm = pyloudnorm.normalize.loudness(pcm, loudness, VOICE_LOUDNESS_LUFS)
    # Not clipped: PersonaPlex feeds the normalized audio to Mimi as it is.
    return AudioVoice(pcm.astype(np.float32))


def load_voice(spec: str, model_dir: Path | None) -> Voice:
    """`spec`: a packaged voice name (NATF2) from the model's voices.tgz, or a path
    to a .wav/.flac/.mp3 (custom voice) or a PersonaPlex .pt voice file."""
    path = Path(spec).expanduser()
    if path.exists():
        return _cached_pt(path) if path.suffix == ".pt" else audio_voice(path)
    if Path(spec).suffix:
        raise UserError(f"{spec}: voice file not found")
    archive = _archive(model_dir, spec)
    folder = unpack(archive)
    if (folder / f"{spec}.pt").exists():
        return _cached_pt(folder / f"{spec}.pt")
    if (folder / f"{spec}.wav").exists():
        return audio_voice(folder / f"{spec}.wav")
    raise UserError(f"voice {spec!r} is not in {archive} (it has: {', '.join(list_voices(folder))})")


def _archive(model_dir: Path | None, spec: str) -> Path:
    if model_dir is not None and (model_dir / VOICES_ARCHIVE).exists():
        return model_dir / VOICES_ARCHIVE
    known = f" (packaged voices: {', '.join(VOICE_NAMES)})" if spec not in VOICE_NAMES else ""
    raise UserError(f"voice {spec!r}: no {VOICES_ARCHIVE} next to the model{known}; "
                    "pass a wav file for a custom voice")
