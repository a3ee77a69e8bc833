"""Tiny random checkpoints in the official format, for tests and demos.

`make_tiny(dir)` writes what an official model repo holds (`model.safetensors`
with the official key names, `config.json` in the official flat layout) at toy
sizes, plus the tiny Mimi codec.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .checkpoint import to_official
from .config import CONFIG, LM_WEIGHTS, MIMI_WEIGHTS, DepformerConfig, LMConfig
from .mimi_checkpoint import write_tiny_mimi
from .models.lm import LM

# Small enough for CI, but every structural feature of the 7B is kept: per-step
# depformer weights, multi-linear inputs, 8 + 8 audio codebooks with the
# official delays, and widths that group-64 quantization divides. The audio card
# equals the tiny Mimi's codebook size (64 bins).
TINY = LMConfig(
    dim=128, num_heads=4, num_layers=2, context=250, text_card=1000, card=64,
    depformer=DepformerConfig(dim=64, num_heads=4, num_layers=2, dim_feedforward=192),
)


def random_lm_weights(cfg: LMConfig, seed: int = 0, dtype=mx.float32) -> dict[str, mx.array]:
    """Random weights under our key names, scaled like a trained model's
    (unit-variance embeddings, 1/sqrt(fan_in) linears, norm gains near 1)."""
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in tree_flatten(LM(cfg).parameters())}
    out = {}
    for key, shape in sorted(shapes.items()):
        if key.endswith("alpha"):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "emb" in key:
            w = rng.standard_normal(shape)
        else:
            w = rng.standard_normal(shape) / np.sqrt(shape[-1])
        out[key] = mx.array(w.astype(np.float32)).astype(dtype)
    return out


def write_lm(directory: str | Path, cfg: LMConfig = TINY, seed: int = 0, dtype=mx.float32) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = to_official(random_lm_weights(cfg, seed, dtype))
    mx.save_safetensors(str(directory / LM_WEIGHTS), weights, metadata={"format": "pt"})
    (directory / CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    return directory


def make_tiny(directory: str | Path, seed: int = 0, cfg: LMConfig = TINY) -> Path:
    """The whole tiny model directory: LM and Mimi codec."""
    directory = write_lm(directory, cfg, seed)
    write_tiny_mimi(directory / MIMI_WEIGHTS, seed=seed)
    return directory
