"""ring_attention: the fused primitive against its pure-MLX reference and a float64 oracle.

Tolerances (max abs error, inputs ~N(0, 1)): float32 2e-5 for summation order,
plus RoPE's angle rounding: a float32 angle p * f carries an error of about
p * 6e-8 rad (std::cos/sin and MLX's differ in the last bit there), so 6e-8 * p
is added for the largest position p. bfloat16 / float16: the fused path rounds
where the reference does, so results differ by one or two units in the last
place: 3e-2 / 4e-3.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference

TOL = {mx.float32: 2e-5, mx.bfloat16: 3e-2, mx.float16: 4e-3}


def rand(rng, shape, dtype):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def poisoned(shape, dtype):
    return mx.full(shape, float("nan"), dtype=dtype)


def assert_close(a, b, dtype, what, max_pos=0):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert np.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    err = np.abs(a - b).max()
    tol = TOL[dtype] + 6e-8 * max_pos
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("B,H,T,D,W", [(1, 1, 1, 8, 4), (3, 2, 1, 16, 8), (2, 4, 3, 32, 8),
                                       (2, 2, 7, 8, 5), (3, 2, 12, 16, 5)])
@pytest.mark.parametrize("rope", [10000.0, None])
def test_fused_matches_reference(B, H, T, D, W, dtype, rope):
    """Random caches, random per-session positions (fresh, mid-ring, far past the wrap),
    T = 1, T > 1 and T > W."""
    rng = np.random.default_rng(hash((B, H, T, D, W, str(dtype), rope)) % 2**32)
    q, k, v = (rand(rng, (B, H, T, D), dtype) for _ in range(3))
    kc, vc = rand(rng, (B, H, W, D), dtype), rand(rng, (B, H, W, D), dtype)
    pos = mx.array(rng.choice([0, 1, W - 1, W, 3 * W + 2, 1000], size=B, replace=B > 6))
    got = ops.ring_attention(q, k, v, kc, vc, pos, rope_max_period=rope)
    ref = reference.ring_attention(q, k, v, kc, vc, pos, rope_max_period=rope)
    max_pos = int(np.array(pos).max()) + T if rope else 0
    for name, a, b in zip(("out", "k_cache", "v_cache"), got, ref):
        assert_close(a, b, dtype, name, max_pos)


def oracle(q, k, v, W, rope_period):
    """Windowed causal attention over a whole sequence, float64 numpy. q,k,v: [H, N, D]."""
    H, N, D = q.shape
    if rope_period:
        freqs = rope_period ** (-2 * np.arange(D // 2) / D)
        ang = np.arange(N)[:, None] * freqs
        c, s = np.cos(ang), np.sin(ang)

        def rot(x):
            re, im = x[..., 0::2], x[..., 1::2]
            out = np.empty_like(x)
            out[..., 0::2], out[..., 1::2] = re * c - im * s, re * s + im * c
            return out

        q, k = rot(q), rot(k)
    out = np.zeros_like(q)
    for p in range(N):
        lo = max(0, p - W + 1)
        s = q[:, p:p + 1] @ k[:, lo:p + 1].transpose(0, 2, 1) / math.sqrt(D)
        w = np.exp(s - s.max(-1, keepdims=True))
        out[:, p] = (w / w.sum(-1, keepdims=True) @ v[:, lo:p + 1])[:, 0]
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_streaming_equals_whole_sequence_windowed_attention(seed):
    """3W positions fed in chunks of mixed sizes (1..W+2) equal attention over the
    whole sequence with a sliding window of W: wrap-around, chunk boundaries and
    chunks longer than the ring included."""
    rng = np.random.default_rng(seed)
    H, D, W, N = 2, 16, 7, 21
    q, k, v = (rng.standard_normal((H, N, D)) for _ in range(3))
    expected = oracle(q, k, v, W, 10000.0)
    # Poisoned caches: a slot read before it is written would make the output NaN.
    kc, vc = poisoned((1, H, W, D), mx.float32), poisoned((1, H, W, D), mx.float32)
    got, p = [], 0
    while p < N:
        T = min(int(rng.integers(1, W + 3)), N - p)
        chunk = [mx.array(x[None, :, p:p + T].astype(np.float32)) for x in (q, k, v)]
        out, kc, vc = ops.ring_attention(*chunk, kc, vc, mx.array([p]))
        got.append(np.array(out[0]))
        p += T
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=2e-5)


def test_sessions_at_different_positions_are_independent():
    """Each row of a batch equals the same session run alone."""
    rng = np.random.default_rng(3)
    B, H, T, D, W = 4, 2, 2, 8, 6
    q, k, v = (rand(rng, (B, H, T, D), mx.float32) for _ in range(3))
    kc, vc = rand(rng, (B, H, W, D), mx.float32), rand(rng, (B, H, W, D), mx.float32)
    pos = mx.array([0, 3, 11, 40])
    batched = ops.ring_attention(q, k, v, kc, vc, pos)
    for b in range(B):
        alone = ops.ring_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], kc[b:b + 1], vc[b:b + 1],
                                   pos[b:b + 1])
        for x, y in zip(batched, alone):
            np.testing.assert_allclose(np.array(x[b]), np.array(y[0]), atol=1e-6)


def test_decode_steps_reuse_the_cache_buffer():
    """A decode loop that drops its old cache references never copies the cache;
    holding on to an old cache forces (correctly) a copy."""
    rng = np.random.default_rng(4)
    B, H, D, W = 2, 2, 16, 32
    kc, vc = mx.zeros((B, H, W, D)), mx.zeros((B, H, W, D))
    mx.eval(kc, vc)
    start = _ext.ring_cache_copies()
    for p in range(3 * W):
        q, k, v = (rand(rng, (B, H, 1, D), mx.float32) for _ in range(3))
        out, kc, vc = ops.ring_attention(q, k, v, kc, vc, mx.array([p, p + 5]))
        mx.eval(out, kc, vc)
    assert _ext.ring_cache_copies() == start

    held = kc
    q, k, v = (rand(rng, (B, H, 1, D), mx.float32) for _ in range(3))
    out, kc, vc = ops.ring_attention(q, k, v, kc, vc, mx.array([0, 0]))
    mx.eval(out, kc, vc, held)
    assert _ext.ring_cache_copies() == start + 1  # the held k cache had to be copied
    assert not np.array_equal(np.array(held), np.array(kc))


def test_lazy_inputs_shared_with_mlx_ops_in_one_eval():
    """The fused op and plain MLX ops over the same unevaluated inputs, evaluated together."""
    rng = np.random.default_rng(5)
    B, H, T, D, W = 2, 2, 3, 8, 6
    x, y = rand(rng, (B, H, T, D), mx.float32), rand(rng, (B, H, T, D), mx.float32)
    kc, vc = rand(rng, (B, H, W, D), mx.float32), rand(rng, (B, H, W, D), mx.float32)
    q, k, v = 2.5 * x + y, x - y, x * y  # lazy
    pos = mx.array([2, 9])
    fused = ops.ring_attention(q, k, v, kc, vc, pos)
    plain = mx.abs(q).sum() + mx.abs(k).sum()
    ref = reference.ring_attention(q, k, v, kc, vc, pos)
    mx.eval(*fused, plain, *ref)
    for a, b in zip(fused, ref):
        assert_close(a, b, mx.float32, "lazy")


def test_bad_shapes_are_rejected_with_a_message():
    q = mx.zeros((1, 2, 1, 8))
    with pytest.raises(ValueError, match="caches must be"):
        ops.ring_attention(q, q, q, mx.zeros((1, 3, 4, 8)), mx.zeros((1, 3, 4, 8)), mx.array([0]))
    with pytest.raises(ValueError, match="pos must be"):
        ops.ring_attention(q, q, q, mx.zeros((1, 2, 4, 8)), mx.zeros((1, 2, 4, 8)), mx.array([0, 1]))


def test_check_mode_records_the_largest_difference():
    rng = np.random.default_rng(6)
    q, k, v = (rand(rng, (1, 2, 1, 8), mx.float32) for _ in range(3))
    kc, vc = rand(rng, (1, 2, 4, 8), mx.float32), rand(rng, (1, 2, 4, 8), mx.float32)
    ops.reset_check_report()
    with ops.use_mode("check"):
        ops.ring_attention(q, k, v, kc, vc, mx.array([5]))
    report = ops.check_report()
    assert set(report) == {"ring_attention"} and 0 <= report["ring_attention"] < 1e-5


class _Layer:
    """The model's pattern: the layer owns its caches and replaces them every step."""

    def __init__(self, B, H, W, D, w):
        self.k, self.v, self.w = mx.zeros((B, H, W, D)), mx.zeros((B, H, W, D)), w

    def step(self, x, pos):
        # q, k, v: still-lazy projections, evaluated in the same graph as the attention.
        q, k, v = (mx.tanh(x @ (self.w * s)) for s in (1.0, 0.5, -1.0))
        out, self.k, self.v = ops.ring_attention(q, k, v, self.k, self.v, pos)
        return out


def test_model_style_decode_copies_no_cache_after_the_first_step():
    """20 decode steps through an object that owns its caches (`self.k, self.v = ...`),
    lazy projections as inputs, only `out` evaluated: after the first step the caches'
    buffers are reused in place, and the results equal the reference path."""
    rng = np.random.default_rng(7)
    B, H, D, W, steps = 2, 2, 16, 8, 20
    w = rand(rng, (D, D), mx.float32) * 0.3
    xs = [rand(rng, (B, H, 1, D), mx.float32) for _ in range(steps)]
    fused, reference_layer = _Layer(B, H, W, D, w), _Layer(B, H, W, D, w)
    copies = []
    for i, x in enumerate(xs):
        pos = mx.array([i, i + 3])
        out = fused.step(x, pos)
        mx.eval(out)
        copies.append(_ext.ring_cache_copies())
        with ops.use_reference():
            ref = reference_layer.step(x, pos)
        assert_close(out, ref, mx.float32, f"step {i}", max_pos=i + 3)
    assert copies[-1] == copies[0], f"cache copies after the first step: {np.diff(copies)}"
    assert_close(fused.k, reference_layer.k, mx.float32, "k_cache", max_pos=steps + 3)


def test_strided_inputs_and_views_are_never_overwritten():
    """Transposed q, caches that are views of a larger array and a scalar position: the
    result is right and the viewed array is left untouched (a view is never donated)."""
    rng = np.random.default_rng(8)
    B, H, T, D, W = 2, 2, 3, 8, 5
    q = rand(rng, (B, T, H, D), mx.float32).transpose(0, 2, 1, 3)
    k, v = rand(rng, (B, H, T, D), mx.float32), rand(rng, (B, H, T, D), mx.float32)
    big_k, big_v = rand(rng, (B, H, 2 * W, D), mx.float32), rand(rng, (B, H, 2 * W, D), mx.float32)
    mx.eval(q, big_k, big_v)
    before = np.array(big_k), np.array(big_v)
    kc, vc = big_k[:, :, ::2], big_v[:, :, 1::2]
    got = ops.ring_attention(q, k, v, kc, vc, 12)
    ref = reference.ring_attention(q, k, v, kc, vc, mx.array([12, 12]))
    mx.eval(*got)
    for name, a, b in zip(("out", "k_cache", "v_cache"), got, ref):
        assert_close(a, b, mx.float32, name, max_pos=15)
    np.testing.assert_array_equal(np.array(big_k), before[0])
    np.testing.assert_array_equal(np.array(big_v), before[1])

