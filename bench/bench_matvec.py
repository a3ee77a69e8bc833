"""Micro-benchmarks of matvec (fused linear layer) vs its pure-MLX reference.

CPU shapes for CI (`pytest bench/`): the depformer's width (1024) with one to
eight rows, dense bfloat16 and q4/q8 weights. The 7B shapes are timed on the GPU
by bench/gpu_bench.py.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("M", [1, 8])
def test_matvec_ffn_in(benchmark, path, bits, M):
    """norm -> gated linear_in at K = 1024, 2 x 1024 weight rows."""
    rng = np.random.default_rng(0)
    K, N = 1024, 2048
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(mx.bfloat16)
    w = mx.array(rng.standard_normal((N, K)).astype(np.float32) / 32).astype(mx.bfloat16)
    alpha = mx.ones((K,), dtype=mx.bfloat16)
    scales = biases = None
    if bits:
        w, scales, biases = mx.quantize(w, group_size=64, bits=bits)
    mx.eval(x, w, alpha, *(a for a in (scales, biases) if a is not None))

    def call():
        return ops.matvec(x, w, scales, biases, bits=bits, alpha=alpha, gate=True)

    with ops.use_mode(path):
        mx.eval(call())
        benchmark(lambda: mx.eval(call()))
