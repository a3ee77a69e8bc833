"""matvec on CUDA: the fused kernel against the numpy emulation of tests/test_matvec.py
(same tolerances: both sum in float32 or better, so they differ by summation order
only) and against the same primitive on the CPU stream, every output buffer
poisoned with NaN first. Covers the 7B and depformer shapes and q4/q8 weights.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops
from tests.test_matvec import EPS, assert_matches, emulate, operands, to_np


pytestmark = pytest.mark.usefixtures("poison")


def gpu_and_cpu(x, w, scales, biases, alpha, res, bits, gate):
    args = (x, w, scales, biases, alpha, res, bits, gate, EPS)
    y_gpu = _ext.matvec(*args, stream=mx.gpu)
    y_cpu = _ext.matvec(*args, stream=mx.cpu)
    mx.eval(y_gpu, y_cpu)
    return y_gpu, y_cpu


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 5, 8, 11])
def test_matvec_gpu_sweep(dtype, bits, M):
    rng = np.random.default_rng(hash(("gpu", str(dtype), bits, M)) % 2**32)
    for K, N in [(256, 90), (1024, 2 * 350)]:
        for norm, gate, residual in [(False, False, False), (True, True, False), (False, False, True),
                                     (True, False, True), (True, True, True)]:
            x, w, scales, biases, W, alpha, res = operands(rng, M, K, N, dtype, bits, norm, gate, residual)
            y_gpu, y_cpu = gpu_and_cpu(x, w, scales, biases, alpha, res, bits, gate)
            what = f"K={K} N={N} norm={norm} gate={gate} residual={residual}"
            want = emulate(x, W, dtype, alpha, gate, res)
            assert_matches(y_gpu, want, dtype, what + " (vs emulation)", res)
            assert_matches(y_gpu, to_np(y_cpu), dtype, what + " (vs CPU)", res)


@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("K, N, gate", [
    (4096, 3 * 4096, False),   # temporal qkv
    (4096, 4096, False),       # temporal out_proj
    (4096, 2 * 11264, True),   # temporal FFN in (gated)
    (11264, 4096, False),      # temporal FFN out
    (1024, 2 * 2816, True),    # depformer FFN in (gated)
    (4096, 32000, False),      # text head
])
def test_matvec_gpu_model_shapes(bits, K, N, gate):
    rng = np.random.default_rng(K + N + bits)
    for M in (1, 8):
        x, w, scales, biases, W, alpha, res = operands(rng, M, K, N, mx.bfloat16, bits, True, gate, True)
        y_gpu, _ = [mx.array(a) for a in gpu_and_cpu(x, w, scales, biases, alpha, res, bits, gate)]
        assert_matches(y_gpu, emulate(x, W, mx.bfloat16, alpha, gate, res), mx.bfloat16,
                       f"M={M} K={K} N={N} bits={bits}", res)


def test_ops_check_mode_on_gpu():
    rng = np.random.default_rng(7)
    x, w, _, _, _, alpha, res = operands(rng, 2, 2048, 512, mx.bfloat16, 0, True, True, True)
    ops.reset_check_report()
    with ops.use_mode("check"):
        y = ops.matvec(x, w, alpha=alpha, gate=True, residual=res, eps=EPS)
        mx.eval(y)
    assert np.isfinite(to_np(y)).all()
    # Both sides on the GPU: MLX's bf16 matmul sums in float32 too.
    assert ops.check_report()["matvec"] <= 0.05
