"""decoder_layers on CUDA: exactly the per-op chain of the fused matvec and
ring_attention on the GPU (the same kernels in the same order), and close to the
same primitive on the CPU stream (per element, relative to the largest value of
its row: float32 1e-5 + 1e-4; bfloat16 four units in the last place, 2^-6, +
2e-2: summation order
differs between the CPU loop and the GPU's split sums, and a flipped last place
grows through the residual stream). Outputs poisoned first.
Shapes: small, the depformer's (C 1024, 16 heads, W 8) and the 7B's (C 4096,
32 heads, hidden 11264, W 3000, two layers)."""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import ops
from tests.test_decoder_layers import caches, make_stack, np32, per_op_chain


pytestmark = pytest.mark.usefixtures("poison")


SHAPES = [  # B, C, H, hidden, W, L, rope
    (1, 128, 2, 128, 6, 3, 10000.0),
    (3, 128, 2, 192, 6, 3, None),
    (8, 1024, 16, 2816, 8, 2, None),         # depformer
    (1, 4096, 32, 11264, 3000, 2, 10000.0),  # 7B temporal, bfloat16 only (float32 adds
    (8, 4096, 32, 11264, 3000, 2, 10000.0),  # nothing there but minutes)
    (17, 1024, 16, 2816, 8, 2, None),        # above 8 sessions: the tensor-core path in 16 bits
    (64, 1024, 16, 2816, 8, 2, 10000.0),
]


@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("dtype, B, C, H, hidden, W, L, rope", [
    (dtype, *shape) for shape in SHAPES for dtype in (mx.float32, mx.bfloat16)
    if not (shape[1] == 4096 and dtype == mx.float32)])
def test_decoder_layers_gpu(dtype, bits, B, C, H, hidden, W, L, rope):
    rng = np.random.default_rng(B + C + bits)
    stack = make_stack(rng, L, C, hidden, bits, dtype)
    ks, vs = caches(rng, L, B, H, W, C // H, dtype)
    x = mx.array(rng.standard_normal((B, C)).astype(np.float32)).astype(dtype)
    # Above 8 sessions only 16-bit rows take the primitive (ops.tensor_cores_take), else the reference.
    assert ops.decoder_layers_fusable(x, stack, H) == (B <= 8 or dtype == mx.bfloat16)
    for pos in (([0, 5, 2 * W + 1, W - 1, W, 7, 8, 9] * 8)[:B], [3 * W + 2] * B):
        pos = mx.array(pos)
        with mx.stream(mx.gpu):
            y, k2, v2 = ops.decoder_layers(x, pos, stack, ks, vs, heads=H, rope_max_period=rope)
            y_op, k_op, v_op = per_op_chain(x, pos, stack, ks, vs, H, rope)
            mx.eval(y, k2, v2, y_op, k_op, v_op)
        if C == 4096:  # the CPU run of the 7B shape costs minutes; the chain above is exact
            ks, vs, x = k2, v2, y
            continue
        with mx.stream(mx.cpu):
            y_cpu, k_cpu, v_cpu = ops.decoder_layers(x, pos, stack, ks, vs, heads=H, rope_max_period=rope)
            mx.eval(y_cpu, k_cpu, v_cpu)
        assert np.isfinite(np32(y)).all()
        np.testing.assert_array_equal(np32(y), np32(y_op))
        for a, b in zip(k2 + v2, k_op + v_op):
            np.testing.assert_array_equal(np32(a), np32(b))
        rel, tol = (1e-5, 1e-4) if dtype == mx.float32 else (2.0**-6, 2e-2)
        for a, b in zip([y] + k2 + v2, [y_cpu] + k_cpu + v_cpu):
            a, b = np32(a), np32(b)
            scale = np.abs(b).max(axis=-1, keepdims=True)  # per row: flips survive cancellation
            assert (np.abs(a - b) <= rel * scale + tol).all(), np.abs(a - b).max()
        ks, vs, x = k2, v2, y
