"""matvec: the fused linear layer (RMSNorm in front, SiLU gate, residual) against a
numpy emulation of the reference's rounding, and against the pure-MLX reference.

The emulation follows reference.matvec's rounding points (normalized x rounded to
the storage type, the product rounded, each gate op rounded, the residual sum
rounded) with float64 sums, so the fused result may differ from it only by the
float32 summation order: a flip of the last place where a value lands near a
rounding boundary. Tolerance per element: |fused - emulated| <= REL * |emulated|
+ ABS, with REL 4 units in the last place of the storage type (a rounded product
can feed two more rounded ops in the gate) and ABS 1e-3 of the output scale for
the cancellations of the residual add.

MLX's own CPU quantized_matmul sums in the storage type (bfloat16 loses ~0.1 over
K = 4096), so the pure-MLX reference is compared only loosely, where it is close.
"""

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, ops, reference

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
REL = {mx.float32: 4 * 2.0**-23, mx.bfloat16: 4 * 2.0**-8, mx.float16: 4 * 2.0**-11}
EPS = 1e-5


def to_np(a):
    return np.array(a.astype(mx.float32)).astype(np.float64)


def round_to(values, dtype):
    return to_np(mx.array(np.asarray(values, dtype=np.float32)).astype(dtype))


def dequantized(w, scales, biases, bits):
    """W as float64 from MLX's affine layout (group 64, packed little-end first)."""
    packed = np.array(w).astype(np.uint64)
    per = 32 // bits
    shifts = (bits * np.arange(per)).astype(np.uint64)
    q = ((packed[..., None] >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)
    s = np.repeat(to_np(scales), 64, axis=1)
    b = np.repeat(to_np(biases), 64, axis=1)
    return s * q + b


def emulate(x, W, dtype, alpha=None, gate=False, residual=None):
    x = to_np(x)
    if alpha is not None:
        x32 = x.astype(np.float32)
        inv = np.float32(1) / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + np.float32(EPS))
        x = round_to(to_np(alpha).astype(np.float32) * (x32 * inv), dtype)
    z = round_to(x @ W.T, dtype)
    if gate:
        g, v = np.split(z, 2, axis=-1)
        sig = round_to(1 / (1 + np.exp(-g)), dtype)
        z = round_to(round_to(g * sig, dtype) * v, dtype)
    if residual is not None:
        z = round_to(to_np(residual) + z, dtype)
    return z


def operands(rng, M, K, N, dtype, bits, norm, gate, residual):
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
    w_full = mx.array((rng.standard_normal((N, K)) / np.sqrt(K)).astype(np.float32)).astype(dtype)
    if bits:
        w, scales, biases = mx.quantize(w_full, group_size=64, bits=bits)
        W = dequantized(w, scales, biases, bits)
    else:
        w, scales, biases, W = w_full, None, None, to_np(w_full)
    alpha = mx.array(rng.uniform(0.5, 1.5, K).astype(np.float32)).astype(dtype) if norm else None
    n_out = N // 2 if gate else N
    res = mx.array(rng.standard_normal((M, n_out)).astype(np.float32)).astype(dtype) if residual else None
    return x, w, scales, biases, W, alpha, res


def assert_matches(got, want, dtype, what, residual=None):
    """Per element within REL of the result, or of the residual where the sum cancels
    (a last-place flip of the product survives the cancellation)."""
    got = to_np(got)
    assert got.shape == want.shape, what
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    scale = np.abs(want) + (0 if residual is None else np.abs(to_np(residual)))
    bound = REL[dtype] * scale + 1e-3 * (np.abs(want).max() + 1e-6)
    worst = (np.abs(got - want) - bound).max()
    assert worst <= 0, f"{what}: error exceeds the bound by {worst:.3g} (max |err| {np.abs(got - want).max():.3g})"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("M", [1, 3, 8, 11, 17, 63, 64, 130])  # the GPU paths' row tiles and chunks
def test_matvec_matches_emulation(dtype, bits, M):
    rng = np.random.default_rng(hash((str(dtype), bits, M)) % 2**32)
    K, N = 256, 90  # 90 rows: outputs that do not fill the GPU kernel's last block
    for norm, gate, residual in [(False, False, False), (True, False, False), (True, True, False),
                                 (False, False, True), (True, True, True), (False, True, True)]:
        x, w, scales, biases, W, alpha, res = operands(rng, M, K, N, dtype, bits, norm, gate, residual)
        y = _ext.matvec(x, w, scales, biases, alpha, res, bits, gate, EPS)
        assert y.dtype == dtype
        assert_matches(y, emulate(x, W, dtype, alpha, gate, res), dtype,
                       f"norm={norm} gate={gate} residual={residual}", res)


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float32])
def test_ops_matvec_is_the_reference_where_it_is_exact(dtype):
    """Dense weights: the fused op and the pure-MLX reference agree to the last places
    (both sum in float32), through ops in check mode, leading dims kept."""
    rng = np.random.default_rng(1)
    x, w, _, _, _, alpha, res = operands(rng, 4, 512, 64, dtype, 0, True, True, True)
    x3, res3 = x.reshape(2, 2, 512), res.reshape(2, 2, 32)
    ops.reset_check_report()
    with ops.use_mode("check"):
        y = ops.matvec(x3, w, alpha=alpha, gate=True, residual=res3, eps=EPS)
    assert y.shape == (2, 2, 32)
    ref = reference.matvec(x3, w, alpha=alpha, gate=True, residual=res3, eps=EPS)
    assert_matches(y, to_np(ref), dtype, "fused vs reference", res3)
    assert 0 <= ops.check_report()["matvec"] <= 8 * REL[dtype] * float(mx.abs(ref).max())


def test_reference_quantized_is_close_to_emulation():
    """The reference (MLX's quantized_matmul) is loosely right; the fused op is tight."""
    rng = np.random.default_rng(2)
    dtype = mx.bfloat16
    x, w, scales, biases, W, *_ = operands(rng, 2, 1024, 64, dtype, 4, False, False, False)
    want = emulate(x, W, dtype)
    ref = to_np(reference.matvec(x, w, scales, biases, bits=4))
    assert np.abs(ref - want).max() <= 0.1 * np.abs(want).max()
    assert_matches(ops.matvec(x, w, scales, biases, bits=4), want, dtype, "fused q4")


def test_many_rows_fall_back_to_the_reference():
    rng = np.random.default_rng(3)
    x, w, *_ = operands(rng, ops.MATVEC_MAX_ROWS + 1, 64, 16, mx.float32, 0, False, False, False)
    assert not ops.matvec_fusable(x, w)
    assert ops.matvec_fusable(x[:ops.MATVEC_MAX_ROWS], w)
    np.testing.assert_allclose(to_np(ops.matvec(x, w)), to_np(x) @ to_np(w).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (lambda x, w, s, b: _ext.matvec(x[0], w, None, None, None, None, 0, False, EPS), "x must be"),
    (lambda x, w, s, b: _ext.matvec(x, w[:, :32], None, None, None, None, 0, False, EPS), "w must be"),
    (lambda x, w, s, b: _ext.matvec(x, w.astype(mx.float16), None, None, None, None, 0, False, EPS),
     "dtype"),
    (lambda x, w, s, b: _ext.matvec(x, w, None, None, None, None, 3, False, EPS), "bits"),
    (lambda x, w, s, b: _ext.matvec(x, mx.quantize(w, 64, 4)[0], None, None, None, None, 4, False,
                                    EPS), "scales"),
    (lambda x, w, s, b: _ext.matvec(x, w, None, None, mx.ones((7,)), None, 0, False, EPS), "alpha"),
    (lambda x, w, s, b: _ext.matvec(x, w, None, None, None, mx.ones((2, 5)), 0, False, EPS),
     "residual"),
    (lambda x, w, s, b: _ext.matvec(x, w[:15], None, None, None, None, 0, True, EPS), "even"),
])
def test_bad_operands_raise(bad, message):
    x = mx.ones((2, 64))
    w = mx.ones((16, 64))
    with pytest.raises(ValueError, match=message):
        bad(x, w, None, None)


def test_ops_without_gpu_kernels_take_the_reference(monkeypatch):
    """A GPU this build has no kernels for: every op runs its pure-MLX reference, fused
    and check modes alike, and nothing is recorded."""
    monkeypatch.setattr(ops, "kernels_here", lambda: False)
    rng = np.random.default_rng(9)
    x, w, *_ = operands(rng, 2, 64, 16, mx.bfloat16, 0, False, False, False)
    ops.reset_check_report()
    for mode in ("fused", "check"):
        with ops.use_mode(mode):
            y = ops.matvec(x, w)
        np.testing.assert_array_equal(to_np(y), to_np(reference.matvec(x, w)))
    assert ops.check_report() == {}
