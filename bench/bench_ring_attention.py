"""Micro-benchmark of ring_attention, fused vs reference, at small CPU shapes.

One decode step (T = 1) and one prefill chunk (T = 8) per call, with the caches fed
back as the model does, so the fused path runs on donated buffers. The bandwidth
floor of a step is reading the window of K and V once: `extra_info["window_MB"]`
divided by the time gives the achieved GB/s. Run with `pytest bench/`.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops


@pytest.mark.parametrize("path", ["fused", "reference"])
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("B", [1, 4])
def test_ring_attention_step(benchmark, path, B, T):
    H, D, W = 8, 64, 256
    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.standard_normal((B, H, T, D)).astype(np.float32)) for _ in range(3))
    state = {"k": mx.zeros((B, H, W, D)), "v": mx.zeros((B, H, W, D)), "pos": 3 * W}
    mx.eval(q, k, v, state["k"], state["v"])

    def step():
        # Positions differ per session and keep crossing the wrap.
        pos = mx.array([state["pos"] + 5 * b for b in range(B)])
        out, state["k"], state["v"] = ops.ring_attention(q, k, v, state["k"], state["v"], pos)
        mx.eval(out, state["k"], state["v"])
        state["pos"] += T

    with ops.use_mode(path):
        step()
        copies = _ext.ring_cache_copies()
        benchmark(step)
    if path == "fused":
        assert _ext.ring_cache_copies() == copies, "a decode step copied the whole cache"
    benchmark.extra_info["window_MB"] = 2 * B * H * W * D * 4 / 1e6
