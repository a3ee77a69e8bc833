"""Micro-benchmarks of sample_topk (temperature, top-k, Gumbel-max) vs its pure-MLX
reference, at the depformer's rows (2048 bins, top 250) and the text head's (32000,
top 25), one and eight sessions, on the CPU. bench/gpu_bench.py times them on the GPU."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("V, top_k", [(2048, 250), (32000, 25)])
@pytest.mark.parametrize("R", [1, 8])
def test_sample_topk(benchmark, path, V, top_k, R):
    rng = np.random.default_rng(0)
    logits = mx.array(rng.standard_normal((R, V)).astype(np.float32)).astype(mx.bfloat16)
    noise = mx.random.gumbel((R, V), key=mx.random.key(0))
    mx.eval(logits, noise)
    with ops.use_mode(path):
        benchmark(lambda: mx.eval(ops.sample_topk(logits, noise, temp=0.8, top_k=top_k)))
