"""conv_transpose1d_stream: the fused streaming transposed conv against its pure-MLX
reference. Tolerances as tests/test_conv1d_stream.py, relative to max(1, max |reference|):
float32 2e-6 (summation order); bfloat16 1.6e-2 / float16 2e-3, four units in the last
place, since the fused path rounds once where the reference rounds the conv, the overlap
add and the bias add (two units were seen).
"""

import mlx.core as mx
import numpy as np
import pytest
from test_conv1d_stream import assert_close, poison_allocator, rand, rng_for

from personaplex_fast import ops, reference

TOL = {mx.float32: 2e-6, mx.bfloat16: 1.6e-2, mx.float16: 2e-3}


def make_convtr(rng, C_in, C_out, K, groups, bias, dtype):
    w = rand(rng, (C_out, K, C_in // groups), dtype, 1 / np.sqrt(C_in / groups))
    return w, (rand(rng, (C_out,), dtype) if bias else None)


# (B, T, C_in, C_out, K, stride, groups): Mimi's 2*ratio upsamplers in miniature, its
# depthwise 25 Hz upsampler (groups = channels), no overlap (K = stride), grouped.
SHAPES = [(1, 1, 8, 4, 16, 8, 1), (2, 3, 12, 6, 4, 2, 1), (3, 2, 16, 16, 4, 2, 16),
          (2, 4, 9, 5, 3, 3, 1), (2, 5, 12, 8, 10, 5, 4), (1, 2, 40, 20, 12, 6, 1)]


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("elu,bias", [(False, True), (True, True), (True, False)])
def test_fused_matches_reference(shape, dtype, elu, bias):
    B, T, C_in, C_out, K, stride, groups = shape
    rng = rng_for(shape, str(dtype), elu, bias)
    x, partial = rand(rng, (B, T, C_in), dtype), rand(rng, (B, K - stride, C_out), dtype)
    w, b = make_convtr(rng, C_in, C_out, K, groups, bias, dtype)
    kw = dict(stride=stride, groups=groups, elu_input=elu)
    poison_allocator((B, T * stride, C_out), (B, K - stride, C_out))
    got = ops.conv_transpose1d_stream(x, partial, w, b, **kw)
    ref = reference.conv_transpose1d_stream(x, partial, w, b, **kw)
    for name, a, r in zip(("y", "partial"), got, ref):
        assert_close(a, r, TOL[dtype], name)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("groups", [1, 6])
def test_streaming_in_chunks_equals_whole_signal(seed, groups):
    """A zero overlap fed chunks of 1..4 frames gives the whole signal's output and final
    overlap; the reference, fed the same chunks, agrees."""
    rng = np.random.default_rng(seed)
    B, T, C, K, stride = 3, 17, 6, 8, 3
    x = rand(rng, (B, T, C))
    w, b = make_convtr(rng, C, C, K, groups, True, mx.float32)

    def run(op, chunks):
        partial, out, p = mx.zeros((B, K - stride, C)), [], 0
        for size in chunks:
            y, partial = op(x[:, p:p + size], partial, w, b, stride=stride, groups=groups,
                            elu_input=True)
            out.append(y)
            p += size
        return mx.concatenate(out, axis=1), partial

    chunks = []
    while sum(chunks) < T:
        chunks.append(min(int(rng.integers(1, 5)), T - sum(chunks)))
    whole = run(ops.conv_transpose1d_stream, [T])
    streamed = run(ops.conv_transpose1d_stream, chunks)
    ref = run(reference.conv_transpose1d_stream, chunks)
    for name, a, s, r in zip(("y", "partial"), whole, streamed, ref):
        assert_close(s, a, 1e-5, f"streamed {name} vs whole")
        assert_close(s, r, 1e-5, f"streamed {name} vs reference")


def test_sessions_are_independent():
    rng = np.random.default_rng(3)
    B, T, C_in, C_out, K, stride = 4, 2, 8, 6, 6, 3
    x, partial = rand(rng, (B, T, C_in)), rand(rng, (B, K - stride, C_out))
    w, b = make_convtr(rng, C_in, C_out, K, 1, True, mx.float32)
    batched = ops.conv_transpose1d_stream(x, partial, w, b, stride=stride)
    for i in range(B):
        alone = ops.conv_transpose1d_stream(x[i:i + 1], partial[i:i + 1], w, b, stride=stride)
        for u, v in zip(batched, alone):
            np.testing.assert_array_equal(np.array(u[i]), np.array(v[0]))


def test_lazy_inputs_shared_with_mlx_ops_in_one_eval():
    rng = np.random.default_rng(5)
    a, c = rand(rng, (2, 3, 8)), rand(rng, (2, 2, 4))
    w, b = make_convtr(rng, 8, 4, 4, 1, True, mx.float32)
    x, partial = 2.5 * a - 1, c * c  # lazy
    fused = ops.conv_transpose1d_stream(x, partial, w, b, stride=2, elu_input=True)
    plain = mx.abs(x).sum() + partial.sum()
    ref = reference.conv_transpose1d_stream(x, partial, w, b, stride=2, elu_input=True)
    mx.eval(*fused, plain, *ref)
    for u, v in zip(fused, ref):
        assert_close(u, v, 1e-5, "lazy")


def test_bad_shapes_are_rejected_with_a_message():
    w = mx.zeros((4, 4, 8))
    with pytest.raises(ValueError, match=r"partial must be \[B, K - stride, C_out\] = \[1, 2, 4\]"):
        ops.conv_transpose1d_stream(mx.zeros((1, 3, 8)), mx.zeros((1, 2, 8)), w, stride=2)
    with pytest.raises(ValueError, match="shorter than stride"):
        ops.conv_transpose1d_stream(mx.zeros((1, 3, 8)), mx.zeros((1, 0, 4)), w, stride=5)
