"""The sampling kernel bodies (kernels/sample_topk.cuh, and depformer_frame.cuh's
embed_add) on the CPU through the portability-layer emulator (tests/emulator),
launched as csrc/sample_topk_cuda.cpp and csrc/depformer_frame_cuda.cpp launch them,
against the CPU paths.

Both are exact: the tokens must equal _ext.sample_topk's on the CPU (every
comparison is on the same float32 values; ties to the lowest index), and embed_add
must give the bits of pre + reference.embed_rows(table, tokens) in the storage
dtype. Tokens start as -2 and outputs as NaN, so an unwritten one shows, and a
guard after each output catches a write past it. Each launch takes its own
fiber-order seed.

The two drivers compile in about 3 s on two cores.
"""

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, reference
from test_kernel_emulator import DTYPE_CODE, build_drivers, check, from_raw, nan_raw, ptr, raw

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
GUARD = 300  # elements after each output, which must stay untouched


class SampleArgs(ctypes.Structure):
    _fields_ = [("V", ctypes.c_int), ("temp", ctypes.c_float)] + [
        (n, ctypes.c_int) for n in ("top_k", "greedy", "has_noise", "has_forced")]


class EmbedArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "D", "rows")]


@pytest.fixture(scope="session")
def sampling_emulator(tmp_path_factory):
    return build_drivers(tmp_path_factory.mktemp("sampling_emulator"), ("sample_topk", "depformer_frame"))


# ------------------------------------------------------------------------- sample_topk


def emulated_sample(emu, logits, noise, forced, temp, top_k, greedy, seed):
    """The kernel's tokens [R], with the primitive's arguments as sample_topk()
    (csrc/sample_topk.cpp) builds them: greedy or temp <= 0 takes the argmax of the
    raw logits, without noise."""
    R, V = logits.shape
    greedy = greedy or not temp > 0
    use_noise = noise is not None and not greedy
    args = SampleArgs(V, 0.0 if greedy else temp, 0 if greedy else top_k, greedy, use_noise,
                      forced is not None)
    lr = raw(logits)
    nr = raw(noise.astype(mx.float32)) if use_noise else None
    fr = raw(forced.astype(mx.int32)) if forced is not None else None
    out = raw(mx.full((R + GUARD,), -2, mx.int32))  # tokens, then a guard nothing may write
    check(emu, emu.emu_sample_topk(DTYPE_CODE[logits.dtype], ptr(lr), ptr(nr), ptr(fr), ptr(out), R,
                                   ctypes.byref(args), seed))
    assert (out[R:] == -2).all(), "sample_topk wrote past its rows"
    return out[:R].copy()


def check_sample(emu, logits, noise, forced, temp, top_k, greedy, seed):
    want = np.array(_ext.sample_topk(logits, noise, forced, temp, top_k, greedy, stream=mx.cpu))
    got = emulated_sample(emu, logits, noise, forced, temp, top_k, greedy, seed)
    np.testing.assert_array_equal(
        got, want, err_msg=f"emulated sample_topk {logits.dtype} V={logits.shape[1]} temp={temp} "
        f"top_k={top_k} greedy={greedy} noise={noise is not None} forced={forced is not None} seed={seed}")
    return got


def mixed_logits(rng, V, dtype):
    """Four rows: two Gaussian (mostly distinct values), two of small integers (many
    exact ties at the k-th value, signed zeros, a few -inf, which are kept when
    fewer than k logits are finite)."""
    gauss = 3 * rng.standard_normal((2, V))
    ints = rng.integers(-2, 3, (2, V)).astype(np.float64)
    ints[ints == 0] *= rng.choice([-1.0, 1.0], size=int((ints == 0).sum()))  # +0 and -0
    ints[1, rng.random(V) < 0.2] = -np.inf
    return mx.array(np.concatenate([gauss, ints]).astype(np.float32)).astype(dtype)


def top_ks(V):
    """0, V and V + 3 keep every logit (as does V - 1 = 0 at V = 1)."""
    return sorted({0, 1, 5, V - 1, V, V + 3})


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [1, 7, 64, 300, 2048])  # 300: a second, partial sweep of the 256 threads
def test_sample_topk_kernel(sampling_emulator, dtype, V):
    emu = sampling_emulator["sample_topk"]
    rng = np.random.default_rng(hash((str(dtype), V)) % 2**32)
    logits = mixed_logits(rng, V, dtype)
    noise = mx.random.gumbel(logits.shape, key=mx.random.key(V))
    forced = mx.array([-1, 2, -1, 0], mx.int32)
    seed = 0
    for top_k in top_ks(V):
        for temp in (0.7, 1.3):
            for use_noise in (True, False):
                seed += 1
                check_sample(emu, logits, noise if use_noise else None, forced if seed % 2 else None,
                             temp, top_k, False, seed)
    # greedy (the noise and top_k are ignored), and temp 0 as greedy
    got = check_sample(emu, logits, noise, forced, 0.8, 5, True, seed + 1)
    check_sample(emu, logits, noise, None, 0.0, 5, False, seed + 2)
    raw_argmax = np.argmax(np.array(logits.astype(mx.float32)), -1)
    np.testing.assert_array_equal(got[[0, 2]], raw_argmax[[0, 2]])


def test_sample_topk_ties_at_the_kth_value(sampling_emulator):
    """Small integers with Gumbel noise: many logits equal the k-th largest, and every
    one of them may win; several fiber orders, every dtype. Rows where the k-th value
    is below the maximum and its ties sit in several warps."""
    emu = sampling_emulator["sample_topk"]
    rng = np.random.default_rng(7)
    R, V = 6, 700
    base = rng.integers(0, 4, (R, V)).astype(np.float32)
    base[:, rng.random(V) < 0.9] = 0.0  # few 1..3s: the k-th value is often 0 or 1
    for dtype in DTYPES:
        logits = mx.array(base).astype(dtype)
        noise = mx.random.gumbel((R, V), key=mx.random.key(11))
        for k in (3, 40, 75, 699):
            for seed in (1, 2, 3):
                check_sample(emu, logits, noise, None, 1.0, k, False, 100 * k + seed)


def test_sample_topk_kth_boundary(sampling_emulator):
    """Distinct logits and one large noise value: on the k-th largest it must win, on
    the (k + 1)-th it must lose (a threshold off by one key shows here, where Gumbel
    noise would catch it only by chance)."""
    emu = sampling_emulator["sample_topk"]
    rng = np.random.default_rng(5)
    V = 300
    base = np.stack([rng.permutation(V) - 150 for _ in range(2)]).astype(np.float32)  # exact in bf16
    order = np.argsort(-base, axis=1)
    for dtype in DTYPES:
        logits = mx.array(base).astype(dtype)
        for i, k in enumerate((1, 5, 37, 256, V - 1)):
            noise = np.zeros((2, V), np.float32)
            noise[0, order[0, k - 1]] = noise[1, order[1, k]] = 1000.0
            for temp in (0.7, 1.3):
                got = check_sample(emu, logits, mx.array(noise), None, temp, k, False, 10 * i + int(temp))
                assert got[0] == order[0, k - 1] and got[1] == order[1, 0], (k, got)


def test_sample_topk_non_finite_rows(sampling_emulator):
    """All -inf and all NaN rows give token 0 (as MLX's argmax), top-k or not; NaN
    logits are never picked nor counted towards the top k (check_sample compares
    with the CPU path, top-k cases included); +inf ties go to the lowest index."""
    emu = sampling_emulator["sample_topk"]
    rng = np.random.default_rng(9)
    V = 64
    base = rng.standard_normal((5, V)).astype(np.float32)
    base[0] = -np.inf
    base[1] = np.nan
    base[2, ::3] = np.nan
    base[3, [9, 5, 40]] = np.inf
    base[4, 0] = np.nan
    noise = mx.random.gumbel((5, V), key=mx.random.key(9))
    for dtype in DTYPES:
        logits = mx.array(base).astype(dtype)
        for seed, (top_k, use_noise, greedy) in enumerate(
                [(0, True, False), (0, False, False), (V, True, False), (0, False, True),
                 (1, False, False), (5, True, False), (30, False, False), (50, True, False)]):
            got = check_sample(emu, logits, noise if use_noise else None, None, 0.9, top_k, greedy, seed)
            assert got[0] == got[1] == 0 and not np.isnan(base[2, got[2]]) and got[3] == 5 and got[4] != 0
        all_bad = logits[:2]  # every k: nothing passes the k-th value (-inf ties all pass)
        for top_k in (1, 5):
            got = check_sample(emu, all_bad, noise[:2], None, 0.9, top_k, False, top_k)
            np.testing.assert_array_equal(got, [0, 0])


def test_sample_topk_large_vocabulary(sampling_emulator):
    emu = sampling_emulator["sample_topk"]
    rng = np.random.default_rng(3)
    logits = mx.array(rng.standard_normal((1, 32000)).astype(np.float32))
    noise = mx.random.gumbel(logits.shape, key=mx.random.key(4))
    check_sample(emu, logits, noise, None, 0.7, 25, False, 1)
    check_sample(emu, logits, noise, mx.array([-1], mx.int32), 1.3, 0, False, 2)


# ------------------------------------------------------------------- embed_add


def emulated_embed_add(emu, pre, table, tokens, seed):
    B, D = pre.shape
    pr, tr, kr = raw(pre), raw(table), raw(tokens.astype(mx.int32))
    out = nan_raw((B * D + GUARD,), pre.dtype)  # [B, D], then a guard nothing may write
    check(emu, emu.emu_embed_add(DTYPE_CODE[pre.dtype], ptr(pr), ptr(tr), ptr(kr), ptr(out),
                                 ctypes.byref(EmbedArgs(B, D, table.shape[0])), seed))
    np.testing.assert_array_equal(out[B * D:], nan_raw((GUARD,), pre.dtype), "embed_add wrote past [B, D]")
    return from_raw(out[:B * D].reshape(B, D), pre.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, D", [(1, 1), (7, 5), (4, 64), (3, 300)])  # partial and whole blocks
def test_embed_add_kernel(sampling_emulator, dtype, B, D):
    """-1 adds a zero row (pre unchanged, -0 to +0); other ids are clamped to the
    table's rows, from below (-2, -7, INT32_MIN) and above (rows, rows + 5, 5000,
    INT32_MAX: ids a crafted voice could carry; row * D must not overflow either)."""
    rng = np.random.default_rng(hash((str(dtype), B, D)) % 2**32)
    rows = 9
    pre = mx.array(rng.standard_normal((B, D)).astype(np.float32)).astype(dtype)
    pre = mx.where(mx.array(rng.random((B, D)) < 0.1), mx.array(-0.0, dtype), pre)
    table = mx.array(rng.standard_normal((rows, D)).astype(np.float32)).astype(dtype)
    choices = [-1, 0, 3, rows - 1, rows, rows + 5, -2, -7, 5000, 2**31 - 1, -(2**31)]
    for seed in (1, 2):
        tokens = mx.array(rng.choice(choices, size=B), mx.int32)
        got = emulated_embed_add(sampling_emulator["depformer_frame"], pre, table, tokens, seed)
        want = pre + reference.embed_rows(table, tokens)
        assert want.dtype == dtype
        np.testing.assert_array_equal(raw(got), raw(want), err_msg=f"embed_add tokens={tokens.tolist()}")
