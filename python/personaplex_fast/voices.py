"""Voice prompts: the packaged PersonaPlex voices, or any wav as a custom voice.

The model repo ships `voices.tgz` with one file per voice (NATF0-3, NATM0-3,
VARF0-4, VARM0-4): a `.pt` recording of the voice phase (the temporal
transformer's input embeddings and the token ring at its end, see prompts.py)
and/or the voice's audio. The archive is unpacked once, safely, and each `.pt`
is read with the torch-free restricted reader and cached as safetensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from . import archive, torchfile
from .audio import SAMPLE_RATE, read_audio
from .config import LMConfig
from .errors import UserError
from .prompts import PackagedVoice

VOICE_NAMES = tuple([f"NATF{i}" for i in range(4)] + [f"NATM{i}" for i in range(4)]
                    + [f"VARF{i}" for i in range(5)] + [f"VARM{i}" for i in range(5)])
VOICES_ARCHIVE = "voices.tgz"
# PersonaPlex levels a voice prompt's audio to -24 LUFS before encoding it.
VOICE_LOUDNESS_LUFS = -24.0
# The recorded ring of a .pt voice is PersonaPlex's: max_delay + 3 positions.
_PT_RING = 4
# The longest voice prompt, audio or recorded: 60 s, 750 frames of 80 ms (the packaged
# voices are a few seconds; every frame is prefilled before the session starts).
MAX_VOICE_SECONDS = 60.0
MAX_VOICE_FRAMES = int(MAX_VOICE_SECONDS * SAMPLE_RATE) // 1920
# voices.tgz as unpacked: members, bytes per member and in all (the official archive
# holds 18 voices of a few MB each). Checked as the archive streams, before the bytes
# are inflated, so a gzip bomb costs at most this much time and no memory.
MAX_ARCHIVE_MEMBERS = 256
MAX_MEMBER_BYTES = 32 << 20
MAX_ARCHIVE_BYTES = 256 << 20


@dataclass(frozen=True)
class AudioVoice:
    pcm: np.ndarray  # float32 mono at 24 kHz, loudness-normalized


Voice = AudioVoice | PackagedVoice


def cache_root() -> Path:
    return archive.cache_dir("voices")


def unpack(path: Path) -> Path:
    """Extract voices.tgz into the cache (once per archive content, archive.py); returns
    the folder of its .pt and .wav files."""
    limits = archive.Limits(MAX_ARCHIVE_MEMBERS, MAX_MEMBER_BYTES, MAX_ARCHIVE_BYTES)
    return archive.unpack(path, cache_root(), "voices", _voice_file, limits)


def _voice_file(name: PurePosixPath) -> str | None:
    # "._x" are macOS resource forks, not voices
    return name.name if name.suffix in (".pt", ".wav") and not name.name.startswith("._") else None


def list_voices(folder: Path) -> list[str]:
    return sorted({p.stem for p in folder.iterdir() if p.suffix in (".pt", ".wav", ".safetensors")})


def read_pt_voice(path: Path) -> PackagedVoice:
    """A PersonaPlex `.pt` voice: {"embeddings": [E, 1, 1, dim], "cache": [1, 17, 4]}
    (its shape only; check_voice compares it with the model)."""
    obj = torchfile.load(path)
    if not isinstance(obj, dict) or "embeddings" not in obj or "cache" not in obj:
        raise UserError(f"{path}: not a PersonaPlex voice (needs 'embeddings' and 'cache')")
    emb, ring = np.asarray(obj["embeddings"]), np.asarray(obj["cache"])
    if emb.ndim < 2 or emb.shape[0] < 1 or emb.size == 0 or not np.issubdtype(emb.dtype, np.floating):
        raise UserError(f"{path}: voice embeddings must be floats of shape [frames, 1, 1, dim], "
                        f"got {emb.dtype} {emb.shape}")
    E = emb.shape[0]
    if ring.ndim != 3 or ring.shape[0] != 1 or ring.shape[2] != _PT_RING or not np.issubdtype(ring.dtype, np.integer):
        raise UserError(f"{path}: voice token cache has shape {ring.shape} ({ring.dtype}), "
                        "expected integers of shape (1, 17, 4)")
    if E + 1 > MAX_VOICE_FRAMES:
        raise UserError(f"{path}: the voice has {E + 1} frames; the limit is {MAX_VOICE_FRAMES} "
                        f"({MAX_VOICE_SECONDS:g} s)")
    # PersonaPlex saved it at offset E + 1: positions E and E + 1 are the ones we need.
    tokens = np.stack([ring[0, :, (E + j) % _PT_RING] for j in (0, 1)]).astype(np.int64)
    return PackagedVoice(emb.reshape(E, -1).astype(np.float32), tokens)


def check_voice(voice: PackagedVoice, cfg: LMConfig, path: Path) -> None:
    """A recorded voice fits the model: its width, its stream count, every token id
    inside its embedding table (an id past a table once crashed `serve`), finite
    embeddings and at most MAX_VOICE_FRAMES frames."""
    emb, tokens = voice.embeddings, voice.ring_tokens
    if emb.ndim != 2 or emb.shape[1] != cfg.dim:
        raise UserError(f"{path}: voice embeddings have width {emb.shape[-1]}, the model needs "
                        f"{cfg.dim}: the voice belongs to another model")
    if not 1 <= len(emb) < MAX_VOICE_FRAMES:
        raise UserError(f"{path}: the voice has {len(emb) + 1} frames; the limit is {MAX_VOICE_FRAMES} "
                        f"({MAX_VOICE_SECONDS:g} s)")
    if tokens.shape != (2, 1 + cfg.n_q):
        raise UserError(f"{path}: the voice's token cache has {tokens.shape[-1]} streams, the model "
                        f"has {1 + cfg.n_q}: the voice belongs to another model")
    # Input ids: the table's rows (the last is the initial token) or -1, "no input".
    rows = np.array([cfg.text_card] + [cfg.card] * cfg.n_q)
    bad = (tokens < -1) | (tokens > rows)
    if bad.any():
        j, c = np.argwhere(bad)[0]
        raise UserError(f"{path}: token {int(tokens[j, c])} of stream {c} is outside its table "
                        f"(-1..{rows[c]}): not a voice for this model")
    if not np.isfinite(emb).all():
        raise UserError(f"{path}: the voice embeddings hold NaN or infinite values")


def _cached_pt(path: Path, cfg: LMConfig) -> PackagedVoice:
    """A .pt voice, checked against the model; converted once to safetensors next to
    it when it lies in the cache, and only after every check passed."""
    from safetensors.numpy import load_file, save_file

    cached = path.with_suffix(".safetensors")
    in_cache = path.resolve().parent.is_relative_to(cache_root().resolve())
    if in_cache and cached.exists():
        try:
            d = load_file(str(cached))
            voice = PackagedVoice(d["embeddings"], d["ring_tokens"])
        except Exception:  # damaged: made again from the .pt below
            voice = None
        if voice is not None:
            check_voice(voice, cfg, path)
            return voice
    voice = read_pt_voice(path)
    check_voice(voice, cfg, path)
    if in_cache:
        # Written aside and renamed: an interrupted write must not leave a bad cache.
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        try:
            save_file({"embeddings": voice.embeddings, "ring_tokens": voice.ring_tokens}, str(tmp))
            os.replace(tmp, cached)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only cache: the voice still works
    return voice


def audio_voice(path: Path) -> AudioVoice:
    import pyloudnorm

    pcm = read_audio(path, max_seconds=MAX_VOICE_SECONDS, limit=" for a voice prompt").astype(np.float64)
    if len(pcm) < SAMPLE_RATE // 2:
        raise UserError(f"{path}: a voice prompt needs at least 0.5 s of audio")
    loudness = pyloudnorm.Meter(SAMPLE_RATE).integrated_loudness(pcm)
    if np.isfinite(loudness):
        pcm = pyloudnorm.normalize.loudness(pcm, loudness, VOICE_LOUDNESS_LUFS)
    # Not clipped: PersonaPlex feeds the normalized audio to Mimi as it is.
    return AudioVoice(pcm.astype(np.float32))


def load_voice(spec: str, model_dir: Path | None, cfg: LMConfig) -> Voice:
    """`spec`: a packaged voice name (NATF2) from the model's voices.tgz, or a path
    to a .wav/.flac/.mp3 (custom voice) or a PersonaPlex .pt voice file; a recorded
    voice is checked against the model `cfg` before use."""
    path = Path(spec).expanduser()
    if path.exists():
        return _cached_pt(path, cfg) if path.suffix == ".pt" else audio_voice(path)
    if Path(spec).suffix:
        raise UserError(f"{spec}: voice file not found")
    archive = _archive(model_dir, spec)
    folder = unpack(archive)
    if (folder / f"{spec}.pt").exists():
        return _cached_pt(folder / f"{spec}.pt", cfg)
    if (folder / f"{spec}.wav").exists():
        return audio_voice(folder / f"{spec}.wav")
    raise UserError(f"voice {spec!r} is not in {archive} (it has: {', '.join(list_voices(folder))})")


def _archive(model_dir: Path | None, spec: str) -> Path:
    if model_dir is not None and (model_dir / VOICES_ARCHIVE).exists():
        return model_dir / VOICES_ARCHIVE
    known = f" (packaged voices: {', '.join(VOICE_NAMES)})" if spec not in VOICE_NAMES else ""
    raise UserError(f"voice {spec!r}: no {VOICES_ARCHIVE} next to the model{known}; "
                    "pass a wav file for a custom voice")
