"""Micro-benchmarks of depformer_frame (all codebook steps of one depformer frame,
sampling included) vs its pure-MLX reference and the per-op loop over the fused ops,
on the tiny model's depformer (CPU, CI). The 7B depformer is timed on the GPU by
bench/gpu_bench.py (its "depformer 8 codebooks" rows)."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops
from personaplex_fast.models.lm import LM
from personaplex_fast.sampling import SamplingConfig
from personaplex_fast.tiny import TINY, random_lm_weights


@pytest.fixture(scope="module")
def lm():
    model = LM(TINY)
    model.load_weights(list(random_lm_weights(TINY, dtype=mx.bfloat16).items()))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("path", ["fused", "per-op", "reference"])
@pytest.mark.parametrize("B", [1, 8])
def test_depformer_frame(benchmark, lm, path, B, monkeypatch):
    h = mx.array(np.random.default_rng(0).standard_normal((B, 1, TINY.dim)).astype(np.float32)).astype(mx.bfloat16)
    text = mx.zeros((B,), mx.int32)
    key = mx.random.key(0)
    if path == "per-op":  # the model's loop over the fused ops, without the primitive
        monkeypatch.setattr(LM, "depformer_weights", lambda self: None)
    with ops.use_mode("reference" if path == "reference" else "fused"):
        benchmark(lambda: mx.eval(lm.depformer_frame(h, text, SamplingConfig(), key)))
