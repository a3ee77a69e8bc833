"""matvec on CUDA: the fused kernel against the numpy emulation of tests/test_matvec.py
(same tolerances: both sum in float32 or better, so they differ by summation order
only) and against the same primitive on the CPU stream, every output buffer
poisoned with NaN first. Covers the 7B and depformer shapes and q4/q8 weights.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops
from personaplex_fast.selftest import matvec_takes_tc
from tests.test_matvec import EPS, assert_matches, emulate, operands, round_to, to_np


pytestmark = pytest.mark.usefixtures("poison")


def expected_w(W, M, K, dtype, bits):
    """W as the call uses it: dequantised to T first on the tensor-core path."""
    return round_to(W, dtype) if bits and matvec_takes_tc(M, K, dtype, bits) else W


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
            want = emulate(x, expected_w(W, M, K, dtype, bits), dtype, alpha, gate, res)
            assert_matches(y_gpu, want, dtype, what + " (vs emulation)", res)
            if not (bits and matvec_takes_tc(M, K, dtype, bits)):  # the CPU sums scale * q . x + bias * sum(x)
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
    for M in (1, 8, 33, 64):
        x, w, scales, biases, W, alpha, res = operands(rng, M, K, N, mx.bfloat16, bits, True, gate, True)
        y_gpu = _ext.matvec(x, w, scales, biases, alpha, res, bits, gate, EPS, stream=mx.gpu)
        assert_matches(y_gpu, emulate(x, expected_w(W, M, K, mx.bfloat16, bits), mx.bfloat16, alpha, gate, res),
                       mx.bfloat16, f"M={M} K={K} N={N} bits={bits}", res)


def check_tc(rng, M, K, rows, dtype, bits, epilogue, what):
    """One matvec on the GPU (whichever path the environment picks) of fresh random operands,
    `rows` weight rows (twice that gated), against the numpy emulation with W rounded to T."""
    norm, gate, residual = epilogue
    x, w, scales, biases, W, alpha, res = operands(rng, M, K, 2 * rows if gate else rows, dtype, bits, norm, gate,
                                                   residual)
    y = _ext.matvec(x, w, scales, biases, alpha, res, bits, gate, EPS, stream=mx.gpu)
    want = emulate(x, round_to(W, dtype) if bits else W, dtype, alpha, gate, res)
    assert_matches(y, want, dtype, f"{what} M={M} norm={norm} gate={gate} residual={residual}", res)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [0, 4, 8])
def test_matvec_tc_every_row_count(dtype, bits, monkeypatch):
    """The tensor-core path forced for every row count 1..64 (ragged ones included: the
    last n8 tile of x part empty) and for 65 and 130 (chunks of 64), fresh random operands each, outputs poisoned, against
    the numpy emulation with W as mx.dequantize gives it; epilogues rotate, and a K of 6
    steps splits several ways over a second block of rows."""
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_MIN_ROWS", "1")
    rng = np.random.default_rng(hash(("tc", str(dtype), bits)) % 2**32)
    epilogues = [(False, False, False), (True, True, False), (False, False, True), (True, False, True),
                 (True, True, True)]
    for M in [*range(1, 65), 65, 130]:  # past 64: chunks of 64 rows
        check_tc(rng, M, 1536, 150, dtype, bits, epilogues[M % len(epilogues)], "tc")


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("variant, bits", [("default", 0), ("default", 4), ("default", 8), ("ahead", 4),
                                           ("late", 0), ("late", 4), ("late", 8), ("ahead-late", 4)])
def test_matvec_tc_long_splits(dtype, variant, bits, monkeypatch):
    """The tensor-core kernels with the split along K forced to 1 and 2
    (PERSONAPLEX_MATVEC_TC_SPLITS), so that a block walks 8 or 4 steps (the rule gives
    the shapes above 1-step splits), at 1 to 64 rows, outputs poisoned; `ahead`: 4-bit
    weights with PERSONAPLEX_MATVEC_TC_AHEAD=1 (..._ahead up to 8 rows); the first step's
    weights loaded before the wait for the kernel before (the default), or `late`, after it
    (PERSONAPLEX_MATVEC_TC_EARLY=0)."""
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_MIN_ROWS", "1")
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_AHEAD", "1" if variant.startswith("ahead") else "0")
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_EARLY", "0" if variant.endswith("late") else "1")
    rng = np.random.default_rng(hash(("long splits", str(dtype), variant, bits)) % 2**32)
    epilogues = [(True, True, False), (False, False, True), (True, False, True), (False, False, False)]
    for i, M in enumerate([1, 5, 8, 9, 17, 33, 63, 64]):
        monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_SPLITS", str(1 + i % 2))
        check_tc(rng, M, 2048, 200, dtype, bits, epilogues[i % len(epilogues)], f"{variant}, {1 + i % 2} splits:")


def test_matvec_tc_off_by_environment(monkeypatch):
    """PERSONAPLEX_MATVEC_TC_MIN_ROWS=65 keeps every call on the streaming kernel: q4 at
    32 rows then matches the CPU path's float32 sums (scale * q . x + bias * sum x)."""
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_MIN_ROWS", "65")
    rng = np.random.default_rng(5)
    x, w, scales, biases, W, alpha, res = operands(rng, 32, 1024, 256, mx.bfloat16, 4, True, False, False)
    y_gpu, y_cpu = gpu_and_cpu(x, w, scales, biases, alpha, res, 4, False)
    assert_matches(y_gpu, emulate(x, W, mx.bfloat16, alpha), mx.bfloat16, "streaming q4, 32 rows")
    assert_matches(y_gpu, to_np(y_cpu), mx.bfloat16, "streaming q4 vs CPU, 32 rows")


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
