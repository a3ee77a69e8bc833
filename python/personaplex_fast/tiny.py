"""Random checkpoints in the official format: tiny ones for tests and demos, and
any size for timing where the real weights cannot be downloaded.

`make_tiny(dir)` writes what an official model repo holds (`model.safetensors`
with the official key names, `config.json` in the official flat layout) at toy
sizes, plus the tiny Mimi codec. `make_random(dir)` writes the official 7B's shape
(or another config's), weights drawn on the device.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import to_official
from .config import CONFIG, LM_WEIGHTS, MIMI_WEIGHTS, DepformerConfig, LMConfig, MimiConfig
from .mimi_checkpoint import write_tiny_mimi
from .tokenizer import write_tiny_tokenizer
from .models.lm import LM

# Small enough for CI, but every structural feature of the 7B is kept: per-step
# depformer weights, multi-linear inputs, 8 + 8 audio codebooks with the
# official delays, and widths that group-64 quantization divides. The audio card
# equals the tiny Mimi's codebook size (64 bins).
TINY = LMConfig(
    dim=128, num_heads=4, num_layers=2, context=250, text_card=1000, card=64,
    depformer=DepformerConfig(dim=64, num_heads=4, num_layers=2, dim_feedforward=192),
)


def random_lm_weights(cfg: LMConfig, seed: int = 0, dtype=mx.float32, device: bool = False) -> dict[str, mx.array]:
    """Random weights under our key names, scaled like a trained model's
    (unit-variance embeddings, 1/sqrt(fan_in) linears, norm gains near 1): drawn by
    numpy in float64 (the same numbers on every machine: the tests' checkpoints), or,
    with device, by mx.random on the default device in dtype, lazily (numpy would
    take minutes and 60 GB for the 7B's 7.7 billion)."""
    shapes = {k: v.shape for k, v in tree_flatten(LM(cfg).parameters())}  # LM's own init stays lazy
    rng = np.random.default_rng(seed)
    keys = mx.random.split(mx.random.key(seed), len(shapes)) if device else None
    out = {}
    for i, (key, shape) in enumerate(sorted(shapes.items())):
        z = mx.random.normal(shape, dtype=dtype, key=keys[i]) if device else rng.standard_normal(shape)
        if key.endswith("alpha"):
            w = 1.0 + 0.1 * z
        elif "emb" in key:
            w = z
        else:
            w = z / float(np.sqrt(shape[-1]))
        out[key] = w if device else mx.array(w.astype(np.float32)).astype(dtype)
    return out


def write_lm(directory: str | Path, cfg: LMConfig = TINY, seed: int = 0, dtype=mx.float32,
             weights: dict[str, mx.array] | None = None) -> Path:
    """config.json and model.safetensors (official key names) of an LM of cfg's shape;
    weights under our names (default: random_lm_weights(cfg, seed, dtype))."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = to_official(random_lm_weights(cfg, seed, dtype) if weights is None else weights)
    mx.save_safetensors(str(directory / LM_WEIGHTS), weights, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return directory


def make_tiny(directory: str | Path, seed: int = 0, cfg: LMConfig = TINY) -> Path:
    """The whole tiny model directory: LM, Mimi codec, text tokenizer and voices."""
    directory = write_lm(directory, cfg, seed)
    write_tiny_mimi(directory / MIMI_WEIGHTS, seed=seed)
    write_tiny_tokenizer(directory, cfg.text_card)
    write_tiny_voices(directory)
    return directory


def make_random(directory: str | Path, cfg: LMConfig | None = None, seed: int = 0, dtype=mx.bfloat16) -> Path:
    """A model directory of cfg's shape (default: the official 7B's) with random weights:
    the LM in dtype drawn on the default device (the 7B's 15 GB in seconds on a GPU), the
    official Mimi, the text tokenizer. No voices.tgz: make_tiny's voices run the model
    (minutes at 7B); conversations without a voice prompt need none."""
    cfg = cfg or LMConfig()
    directory = write_lm(directory, cfg, weights=random_lm_weights(cfg, seed, dtype, device=True))
    write_tiny_mimi(directory / MIMI_WEIGHTS, MimiConfig(), seed=seed)
    write_tiny_tokenizer(directory, cfg.text_card)
    return directory


def write_tiny_voices(directory: Path, seed: int = 0) -> None:
    """voices.tgz with the official layout and names (all 18): voices/NAME.pt recordings
    of the voice phase (made as PersonaPlex makes them, from the voice's audio), and wavs."""
    import tarfile
    import tempfile

    from . import torchfile
    from .loading import load_model
    from .prompts import build_frames, input_tokens
    from .audio import write_wav
    from .session_prompt import special_codes
    from .voices import VOICE_NAMES

    model = load_model(directory)
    silence, sine = special_codes(model.mimi)
    pcms = [_synthetic_voice(seed + i) for i in range(len(VOICE_NAMES))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "voices"
        folder.mkdir()
        for name, pcm, codes in zip(VOICE_NAMES, pcms, _encode_all(model.mimi, pcms)):
            write_wav(folder / f"{name}.wav", pcm)
            frames = build_frames(codes, len(codes), [], silence)
            E = len(codes) - 1
            tokens = [input_tokens(model.lm, frames, sine, p) for p in range(E + 2)]
            emb = np.array(model.lm.embed_frame_sequence(mx.array(np.stack(tokens[:E]).astype(np.int32))))
            ring = np.full((1, model.lm.cfg.n_q + 1, 4), -2, dtype=np.int64)
            for j in (0, 1):
                ring[0, :, (E + j) % 4] = tokens[E + j]
            torchfile.save(folder / f"{name}.pt", {"embeddings": emb.reshape(E, 1, 1, -1), "cache": ring},
                           bf16=("embeddings",))
        with tarfile.open(directory / "voices.tgz", "w:gz", compresslevel=1) as tar:
            tar.add(folder, arcname="voices")


def _encode_all(mimi, pcms: list[np.ndarray]) -> np.ndarray:
    """Mimi codes [voices, frames, codebooks] of equal-length clips, streamed as one batch
    (session_prompt.encode_frames one at a time, 18 times faster)."""
    fs = mimi.cfg.frame_size
    batch = np.stack(pcms)
    n = -(-batch.shape[1] // fs)
    batch = np.pad(batch, ((0, 0), (0, n * fs - batch.shape[1])))
    state = mimi.new_encoder_state(len(pcms))
    codes = []
    for i in range(n):
        c = mimi.encode_step(mx.array(batch[:, i * fs:(i + 1) * fs]), state)
        mx.eval(c, *state.arrays())
        codes.append(np.array(c))
    return np.stack(codes, axis=1)


def _synthetic_voice(seed: int, seconds: float = 2.0, sr: int = 24000) -> np.ndarray:
    """A voiced, vowel-like signal with a wandering pitch: enough to give distinct codes."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 110 + 60 * rng.random() + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    pcm = sum(np.sin(k * phase) / k for k in range(1, 8)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2)
    return (0.2 * pcm / np.abs(pcm).max()).astype(np.float32)
