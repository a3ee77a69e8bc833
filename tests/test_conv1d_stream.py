"""conv1d_stream: the fused streaming causal conv against its pure-MLX reference.

Tolerances are on max abs error relative to max(1, max |reference|) (inputs ~N(0, 1),
weights scaled by 1/sqrt(K * C_in / groups), so outputs are O(1)): float32 2e-6 for
summation order. bfloat16 / float16: the fused path accumulates in float32 and rounds
once (after the bias), the reference rounds the conv and then the bias add, and ELU's
exp may round differently: two units in the last place were seen (2^-7 / 2^-10), we
allow four: 1.6e-2 / 2e-3. The state is a copy of conv inputs: exact without ELU, one
unit in the last place with it.
"""

import zlib

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference

TOL = {mx.float32: 2e-6, mx.bfloat16: 1.6e-2, mx.float16: 2e-3}


def rng_for(*params):
    return np.random.default_rng(zlib.crc32(repr(params).encode()))


def rand(rng, shape, dtype=mx.float32, scale=1.0):
    return mx.array((scale * rng.standard_normal(shape)).astype(np.float32)).astype(dtype)


def poison_allocator(*shapes):
    """Leave NaN-filled buffers in MLX's buffer cache, so an output the op forgets to
    write most likely reads as NaN."""
    junk = [mx.full(s, float("nan")) for s in shapes]
    mx.eval(*junk)
    del junk


def assert_close(a, b, tol, what):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    assert a.shape == b.shape, f"{what}: shape {a.shape} != {b.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values (unwritten output?)"
    if not a.size:
        return
    err, scale = np.abs(a - b).max(), max(1.0, np.abs(b).max())
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:.3g} * {scale:.3g}"


def make_conv(rng, C_in, C_out, K, groups, bias, dtype):
    w = rand(rng, (C_out, K, C_in // groups), dtype, 1 / np.sqrt(K * C_in / groups))
    return w, (rand(rng, (C_out,), dtype) if bias else None)


# (B, T, C_in, C_out, K, stride, dilation, groups): SEANet's shapes in miniature
# (kernel 7 input conv, dilated residual convs, 2*ratio strided downsamples, 1x1),
# odd channel counts past the 8-lane dot, grouped, and a chunk shorter than the context.
SHAPES = [(1, 4, 1, 8, 7, 1, 1, 1), (2, 6, 16, 8, 3, 1, 2, 1), (3, 8, 12, 24, 8, 4, 1, 1),
          (2, 5, 19, 13, 1, 1, 1, 1), (2, 4, 8, 12, 3, 2, 3, 4), (1, 2, 40, 33, 7, 1, 1, 1),
          (2, 10, 24, 48, 10, 5, 1, 1)]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("elu,bias,replicate", [(False, True, False), (True, True, False),
                                                (True, False, True), (False, False, True)])
def test_fused_matches_reference(shape, dtype, elu, bias, replicate):
    B, T, C_in, C_out, K, stride, dilation, groups = shape
    rng = rng_for(shape, str(dtype), elu, bias, replicate)
    context = (K - 1) * dilation + 1 - stride
    x, prev = rand(rng, (B, T, C_in), dtype), rand(rng, (B, context, C_in), dtype)
    w, b = make_conv(rng, C_in, C_out, K, groups, bias, dtype)
    first = mx.array(rng.random(B) < 0.5) if replicate else None
    kw = dict(stride=stride, dilation=dilation, elu_input=elu, groups=groups, first=first)
    poison_allocator((B, T // stride, C_out), (B, context, C_in))
    y, state = ops.conv1d_stream(x, prev, w, b, **kw)
    y_ref, state_ref = reference.conv1d_stream(x, prev, w, b, **kw)
    assert_close(y, y_ref, TOL[dtype], "y")
    assert_close(state, state_ref, 0.0 if not elu else TOL[dtype],
                 "state")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("replicate", [False, True])
def test_streaming_in_chunks_equals_whole_signal(seed, replicate):
    """A zero state fed chunks of random lengths (some shorter than the context) gives the
    whole signal's output and final state; the reference, fed the same chunks, agrees."""
    rng = np.random.default_rng(seed)
    B, C_in, C_out, K, stride, dilation = 3, 10, 6, 5, 2, 2
    context = (K - 1) * dilation + 1 - stride
    n = 30 * stride
    x = rand(rng, (B, n, C_in))
    w, b = make_conv(rng, C_in, C_out, K, 1, True, mx.float32)

    def run(op, chunks):
        state, first, out, p = mx.zeros((B, context, C_in)), mx.ones((B,), mx.bool_), [], 0
        for size in chunks:
            y, state = op(x[:, p:p + size], state, w, b, stride=stride, dilation=dilation,
                          elu_input=True, first=first if replicate else None)
            first = mx.zeros_like(first)
            out.append(y)
            p += size
        return mx.concatenate(out, axis=1), state

    chunks = []
    while sum(chunks) < n:
        chunks.append(min(stride * int(rng.integers(1, 6)), n - sum(chunks)))
    whole = run(ops.conv1d_stream, [n])
    streamed = run(ops.conv1d_stream, chunks)
    ref = run(reference.conv1d_stream, chunks)
    for name, a, b_, c in zip(("y", "state"), whole, streamed, ref):
        assert_close(b_, a, 1e-5, f"streamed {name} vs whole")
        assert_close(b_, c, 1e-5, f"streamed {name} vs reference")


def test_sessions_are_independent():
    """Each row of a batch (mixed first flags) equals the same session run alone."""
    rng = np.random.default_rng(3)
    B, T, C_in, C_out, K, stride = 4, 6, 8, 5, 6, 3
    x, prev = rand(rng, (B, T, C_in)), rand(rng, (B, K - stride, C_in))
    w, b = make_conv(rng, C_in, C_out, K, 1, True, mx.float32)
    first = mx.array([True, False, True, False])
    batched = ops.conv1d_stream(x, prev, w, b, stride=stride, elu_input=True, first=first)
    for i in range(B):
        alone = ops.conv1d_stream(x[i:i + 1], prev[i:i + 1], w, b, stride=stride, elu_input=True,
                                  first=first[i:i + 1])
        for u, v in zip(batched, alone):
            np.testing.assert_array_equal(np.array(u[i]), np.array(v[0]))


def test_lazy_inputs_shared_with_mlx_ops_in_one_eval():
    rng = np.random.default_rng(5)
    a, c = rand(rng, (2, 6, 8)), rand(rng, (2, 2, 8))
    w, b = make_conv(rng, 8, 4, 3, 1, True, mx.float32)
    x, prev = 2.5 * a - 1, c * c  # lazy
    fused = ops.conv1d_stream(x, prev, w, b, elu_input=True)
    plain = mx.abs(x).sum() + prev.sum()
    ref = reference.conv1d_stream(x, prev, w, b, elu_input=True)
    mx.eval(*fused, plain, *ref)
    for u, v in zip(fused, ref):
        assert_close(u, v, 1e-5, "lazy")


def test_bad_shapes_are_rejected_with_a_message():
    w = mx.zeros((4, 3, 8))
    with pytest.raises(ValueError, match=r"previous must be \[B, 2, C_in\]"):
        ops.conv1d_stream(mx.zeros((1, 4, 8)), mx.zeros((1, 3, 8)), w)
    with pytest.raises(ValueError, match="not a multiple of stride 2"):
        ops.conv1d_stream(mx.zeros((1, 3, 8)), mx.zeros((1, 1, 8)), w, stride=2)
    with pytest.raises(ValueError, match="does not fit"):
        ops.conv1d_stream(mx.zeros((1, 4, 6)), mx.zeros((1, 2, 6)), w)


def test_check_mode_records_the_largest_difference():
    rng = np.random.default_rng(6)
    w, b = make_conv(rng, 8, 4, 1, 1, True, mx.float32)
    ops.reset_check_report()
    with ops.use_mode("check"):
        y, state = ops.conv1d_stream(rand(rng, (2, 3, 8)), mx.zeros((2, 0, 8)), w, b)
    assert state.shape == (2, 0, 8) and y.shape == (2, 3, 4)
    report = ops.check_report()
    assert set(report) == {"conv1d_stream"} and 0 <= report["conv1d_stream"] < 1e-5


def test_empty_chunk_with_first_set_keeps_the_context():
    """T = 0 with replicate padding requested: there is no sample to repeat, so the
    state stays `previous` (the CUDA path does the same)."""
    rng = np.random.default_rng(11)
    prev = mx.array(rng.standard_normal((2, 4, 3)).astype(np.float32))  # (8 - 1) + 1 - 4
    w = mx.array(rng.standard_normal((4, 8, 3)).astype(np.float32))
    x = mx.zeros((2, 0, 3))
    y, state = _ext.conv1d_stream(x, prev, w, None, mx.array([True, False]), 4, 1, 1, False)
    assert y.shape == (2, 0, 4)
    np.testing.assert_array_equal(np.array(state), np.array(prev))
