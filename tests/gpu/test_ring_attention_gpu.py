"""ring_attention on CUDA: the fused kernels against the pure-MLX reference, both on the GPU.

The sweep compares with the reference run on the CPU stream: on the GPU, MLX's
float32 matmul rounds like TF32, which alone is ~6e-4 off. The tests that mix
both in one GPU graph allow for that (2e-3). Tolerances otherwise as in
tests/test_ring_attention.py (max abs error, inputs ~N(0, 1)):
float32 2e-5 plus RoPE's angle rounding: exp() of the frequency may differ by
an ulp between CUDA and MLX's CPU, so the angle by p * 1.2e-7 and the rotated
value (|x| up to ~2.5) by 3e-7 * p at the largest position p; bfloat16 /
float16 a few units in the last place, 3e-2 / 4e-3. Longer dot products (D = 128)
and the 3000-slot window sum more terms, so float32 there gets 5e-5.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference

TOL = {mx.float32: 2e-5, mx.bfloat16: 3e-2, mx.float16: 4e-3}


def rand(rng, shape, dtype):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def assert_close(a, b, dtype, what, max_pos=0, extra=0.0):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert np.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = np.abs(a - b).max()
    tol = TOL[dtype] + 3e-7 * max_pos + extra
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def positions(rng, B, W):
    """Fresh, mid-ring, just past the wrap and far past it, different per session."""
    return mx.array(rng.choice([0, 1, W // 2, W - 1, W, 2 * W + 3, 7 * W + 5], size=B, replace=B > 7))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("B", [1, 3, 8])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("W,D,H", [(8, 64, 4), (8, 128, 2), (3000, 128, 32), (3000, 64, 8)])
def test_fused_matches_reference_on_gpu(B, T, W, D, H, dtype):
    if dtype == mx.float16 and W == 3000 and B == 8:
        pytest.skip("float16 covered at the smaller batches")
    rng = np.random.default_rng(hash((B, T, W, D, H, str(dtype))) % 2**32)
    q, k, v = (rand(rng, (B, H, T, D), dtype) for _ in range(3))
    kc, vc = rand(rng, (B, H, W, D), dtype), rand(rng, (B, H, W, D), dtype)
    pos = positions(rng, B, W)
    with mx.stream(mx.cpu):  # MLX's CUDA float32 matmul rounds like TF32 (~6e-4 here)
        ref = reference.ring_attention(q, k, v, kc, vc, pos)
        mx.eval(ref)
    got = ops.ring_attention(q, k, v, kc, vc, pos)
    mx.eval(got)
    max_pos = int(np.array(pos).max()) + T
    extra = 3e-5 if (dtype == mx.float32 and (W == 3000 or D == 128)) else 0.0
    for name, a, b in zip(("out", "k_cache", "v_cache"), got, ref):
        assert_close(a, b, dtype, name, max_pos, extra)


def test_unwritten_output_would_show():
    """The outputs start from fresh allocations: poison what the allocator hands
    back by running a NaN-filled op of the same sizes first, then check finiteness."""
    rng = np.random.default_rng(1)
    B, H, T, D, W = 2, 4, 1, 128, 64
    for _ in range(3):
        mx.eval(mx.full((B, H, T, D), float("nan")), mx.full((B, H, W, D), float("nan")))
        q, k, v = (rand(rng, (B, H, T, D), mx.float32) for _ in range(3))
        kc, vc = rand(rng, (B, H, W, D), mx.float32), rand(rng, (B, H, W, D), mx.float32)
        pos = mx.array([5, 200])
        got = ops.ring_attention(q, k, v, kc, vc, pos)
        ref = reference.ring_attention(q, k, v, kc, vc, pos)
        for a, b in zip(got, ref):
            assert_close(a, b, mx.float32, "poisoned", 205, extra=2e-3)


def test_streaming_decode_matches_reference_across_the_wrap():
    """A decode loop of 3W steps with per-session positions, fused and reference caches
    carried separately; every step compared."""
    rng = np.random.default_rng(2)
    B, H, D, W = 3, 4, 64, 16
    kc = vc = None
    caches = {}
    for path in ("fused", "reference"):
        kc, vc = mx.zeros((B, H, W, D)), mx.zeros((B, H, W, D))
        caches[path] = [kc, vc]
    start = np.array([0, 5, 40])
    for step in range(3 * W):
        q, k, v = (rand(rng, (B, H, 1, D), mx.float32) for _ in range(3))
        pos = mx.array(start + step)
        outs = {}
        for path in ("fused", "reference"):
            with ops.use_mode(path):
                out, kc, vc = ops.ring_attention(q, k, v, *caches[path], pos)
            caches[path] = [kc, vc]
            outs[path] = out
        mx.eval(outs, caches)
        assert_close(outs["fused"], outs["reference"], mx.float32, f"step {step}", 200, 2e-3)
    for a, b in zip(caches["fused"], caches["reference"]):
        assert_close(a, b, mx.float32, "caches", 200, 2e-3)


def test_lazy_inputs_shared_with_mlx_ops_in_one_eval():
    """The fused op and plain MLX ops over the same unevaluated inputs, in one graph."""
    rng = np.random.default_rng(5)
    for dtype in (mx.float32, mx.bfloat16):
        B, H, T, D, W = 3, 8, 4, 128, 3000
        x, y = rand(rng, (B, H, T, D), dtype), rand(rng, (B, H, T, D), dtype)
        a, c = rand(rng, (B, H, W, D), dtype), rand(rng, (B, H, W, D), dtype)
        mx.eval(x, y, a, c)
        q, k, v = 2.5 * x + y, x - y, x * y  # lazy
        kc, vc = a * 0.5, c + 1.0  # lazy caches, produced in the same graph
        pos = mx.array([2, 2999, 3001])
        fused = ops.ring_attention(q, k, v, kc, vc, pos)
        plain = mx.abs(fused[0] - (2.5 * x + y)).max() + mx.abs(q).sum() + mx.abs(kc).sum()
        ref = reference.ring_attention(q, k, v, kc, vc, pos)
        mx.eval(*fused, plain, *ref)
        for f, r in zip(fused, ref):
            # An ordering bug shows as O(1) errors; RoPE rounding at p ~ 3000 can reach 1e-3.
            assert_close(f, r, dtype, f"lazy {dtype}", 3005, extra=3e-3)
        expected = mx.abs(ref[0] - (2.5 * x + y)).max() + mx.abs(q).sum() + mx.abs(kc).sum()
        assert abs(float(plain) - float(expected)) <= 1e-3 * abs(float(expected))


def test_decode_steps_reuse_the_cache_buffer():
    """A decode loop that drops its old caches never copies them; holding one forces a copy."""
    rng = np.random.default_rng(4)
    B, H, D, W = 2, 32, 128, 3000
    kc, vc = mx.zeros((B, H, W, D), mx.bfloat16), mx.zeros((B, H, W, D), mx.bfloat16)
    mx.eval(kc, vc)
    start = _ext.ring_cache_copies()
    for p in range(50):
        q, k, v = (rand(rng, (B, H, 1, D), mx.bfloat16) for _ in range(3))
        out, kc, vc = ops.ring_attention(q, k, v, kc, vc, mx.array([p, p + 2990]))
        mx.eval(out, kc, vc)
    assert _ext.ring_cache_copies() == start
    held = kc
    q, k, v = (rand(rng, (B, H, 1, D), mx.bfloat16) for _ in range(3))
    out, kc, vc = ops.ring_attention(q, k, v, kc, vc, mx.array([0, 0]))
    mx.eval(out, kc, vc, held)
    assert _ext.ring_cache_copies() == start + 1
    assert not np.array_equal(np.array(held.astype(mx.float32)), np.array(kc.astype(mx.float32)))


def test_unsupported_head_dim_is_a_clear_error():
    q = mx.zeros((1, 1, 1, 48))
    with pytest.raises(ValueError, match="head dim must be 16, 32, 64 or 128"):
        mx.eval(ops.ring_attention(q, q, q, mx.zeros((1, 1, 8, 48)), mx.zeros((1, 1, 8, 48)), mx.array([0])))


@pytest.mark.parametrize("D", [16, 32])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_small_head_dims(D, dtype):
    """The tiny test model's head sizes (16 and 32) against the reference on the CPU."""
    rng = np.random.default_rng(D)
    B, H, W = 3, 4, 10
    for T in (1, 5):
        q, k, v = (rand(rng, (B, H, T, D), dtype) for _ in range(3))
        kc, vc = (rand(rng, (B, H, W, D), dtype) for _ in range(2))
        pos = mx.array([0, W - 2, 3 * W + 1])
        got = ops.ring_attention(q, k, v, kc, vc, pos)
        mx.eval(got)
        with mx.stream(mx.cpu):
            want = reference.ring_attention(q, k, v, kc, vc, pos)
            mx.eval(want)
        for a, b, what in zip(got, want, ("out", "k_cache", "v_cache")):
            assert_close(a, b, dtype, f"D={D} T={T} {what}", max_pos=3 * W + T)
