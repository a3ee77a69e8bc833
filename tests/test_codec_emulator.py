"""The codec kernel bodies (kernels/{codec,conv1d_stream,conv_transpose1d_stream,rvq}.cuh)
on the CPU through the portability-layer emulator (tests/emulator), launched as
csrc/*_cuda.cpp launch them, against the primitives' CPU paths.

Outputs and temporaries start as NaN (codes as -1), so an unwritten element shows.
Tolerances are those of tests/gpu/test_codec_gpu.py, max abs error relative to
max(1, max |expected|): the convs sum in the kernel's order (lane groups), the CPU
paths in theirs; previous' is exact without ELU; rvq codes and decodes are exact.

The three drivers compile in about 6 s on two cores.
"""

import ctypes

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext
from test_conv1d_stream import assert_close, rand
from test_kernel_emulator import DTYPE_CODE, build_drivers, check, from_raw, nan_raw, ptr, raw

TOL = {mx.float32: 1e-5, mx.bfloat16: 1.6e-2, mx.float16: 2e-3}
DTYPES = [mx.float32, mx.bfloat16, mx.float16]


class Conv1dArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "T", "C_in", "C_out", "K", "context", "stride",
                                            "dilation", "groups", "lanes", "has_bias")]


class ConvTrArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "T", "C_in", "C_out", "K", "stride", "groups",
                                            "lanes", "has_bias")]


class RvqArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("n", "n_q", "bins", "D")]


@pytest.fixture(scope="session")
def codec_emulator(tmp_path_factory):
    return build_drivers(tmp_path_factory.mktemp("codec_emulator"),
                         ("conv1d_stream", "conv_transpose1d_stream", "rvq"))




# ------------------------------------------------------------------------ conv1d_stream


def emulated_conv1d(emu, x, prev, w, b, first, stride, dilation, groups, elu, lanes, seed):
    """lanes: 0 for the host's lane count (conv_lanes), else a G to force."""
    B, T, C_in = x.shape
    C_out, K, _ = w.shape
    context = prev.shape[1]
    y, prev_out = nan_raw((B, T // stride, C_out), x.dtype), nan_raw(prev.shape, x.dtype)
    args = Conv1dArgs(B, T, C_in, C_out, K, context, stride, dilation, groups, lanes, b is not None)
    ins = [None if a is None else raw(a) for a in (x, prev, w, b, first)]
    check(emu, emu.emu_conv1d_stream(DTYPE_CODE[x.dtype], *map(ptr, ins), ptr(y), ptr(prev_out),
                                     ctypes.byref(args), elu, seed))
    return from_raw(y, x.dtype), from_raw(prev_out, x.dtype)


# (T, C_in, C_out, K, stride, dilation, groups): one lane per output (7 taps of one
# channel), dilation, strides, groups, depthwise, a wide reduction (a warp per output),
# no context (K = 1, and K = stride), chunks shorter than the context, and no new samples.
CONVS = [(4, 1, 8, 7, 1, 1, 1), (6, 16, 8, 3, 1, 2, 1), (8, 12, 24, 8, 4, 1, 1),
         (5, 19, 13, 1, 1, 1, 1), (4, 8, 12, 3, 2, 3, 4), (2, 40, 33, 7, 1, 1, 1),
         (3, 300, 7, 1, 1, 1, 1), (2, 48, 48, 3, 1, 1, 48), (8, 6, 5, 4, 4, 1, 1),
         (0, 8, 8, 3, 1, 1, 1)]


def check_conv1d(emu, shape, dtype, elu, bias, replicate, lanes=0, seed=0):
    T, C_in, C_out, K, stride, dilation, groups = shape
    rng = np.random.default_rng(hash((shape, str(dtype), elu, bias, replicate, lanes)) % 2**32)
    B, context = 3, (K - 1) * dilation + 1 - stride
    x, prev = rand(rng, (B, T, C_in), dtype), rand(rng, (B, context, C_in), dtype)
    w = rand(rng, (C_out, K, C_in // groups), dtype, 1 / np.sqrt(K * C_in / groups))
    b = rand(rng, (C_out,), dtype) if bias else None
    first = mx.array(np.arange(B) % 2 == 0) if replicate else None  # sessions 0 and 2 start
    got = emulated_conv1d(emu, x, prev, w, b, first, stride, dilation, groups, elu, lanes, seed)
    want = _ext.conv1d_stream(x, prev, w, b, first, stride, dilation, groups, elu, stream=mx.cpu)
    what = f"emulated conv1d {shape} elu={elu} bias={bias} replicate={replicate} lanes={lanes}"
    assert_close(got[0], want[0], TOL[dtype], f"{what}: y")
    assert_close(got[1], want[1], TOL[dtype] if elu else 0.0, f"{what}: previous'")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CONVS)
def test_conv1d_stream_kernels(codec_emulator, shape, dtype):
    for i, (elu, bias, replicate) in enumerate([(False, True, False), (True, True, False),
                                                (True, False, True), (False, False, True)]):
        check_conv1d(codec_emulator["conv1d_stream"], shape, dtype, elu, bias, replicate, seed=i)


@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16, 32])
def test_conv1d_stream_any_lane_count(codec_emulator, lanes):
    """The host picks G from the shape; the kernel must hold for every G, including G
    not a multiple of C_in / groups (5 here) and G beyond the products (15)."""
    check_conv1d(codec_emulator["conv1d_stream"], (6, 10, 8, 3, 1, 1, 2), mx.float32, True, True,
                 True, lanes)


# ---------------------------------------------------------------- conv_transpose1d_stream


def emulated_convtr(emu, x, partial, w, b, stride, groups, elu, lanes, seed):
    B, T, C_in = x.shape
    C_out, K, _ = w.shape
    y, partial_out = nan_raw((B, T * stride, C_out), x.dtype), nan_raw(partial.shape, x.dtype)
    args = ConvTrArgs(B, T, C_in, C_out, K, stride, groups, lanes, b is not None)
    ins = [None if a is None else raw(a) for a in (x, partial, w, b)]
    check(emu, emu.emu_conv_transpose1d_stream(DTYPE_CODE[x.dtype], *map(ptr, ins), ptr(y),
                                               ptr(partial_out), ctypes.byref(args), elu, seed))
    return from_raw(y, x.dtype), from_raw(partial_out, x.dtype)


# (T, C_in, C_out, K, stride, groups): Mimi's upsample ratios, depthwise, K = stride (no
# overlap), groups, overlap beyond one frame's rows (K = 10, stride 2), a wide reduction,
# and no new frames (partial' is then the old overlap, shifted).
CONVTRS = [(1, 8, 4, 16, 8, 1), (3, 12, 6, 4, 2, 1), (2, 16, 16, 4, 2, 16), (4, 9, 5, 3, 3, 1),
           (5, 12, 8, 10, 5, 4), (1, 10, 4, 10, 2, 1), (3, 300, 6, 4, 2, 1), (0, 8, 4, 4, 2, 1)]


def check_convtr(emu, shape, dtype, elu, bias, lanes=0, seed=0):
    T, C_in, C_out, K, stride, groups = shape
    rng = np.random.default_rng(hash((shape, str(dtype), elu, bias, lanes)) % 2**32)
    B = 3
    x, partial = rand(rng, (B, T, C_in), dtype), rand(rng, (B, K - stride, C_out), dtype)
    w = rand(rng, (C_out, K, C_in // groups), dtype, 1 / np.sqrt(C_in / groups))
    b = rand(rng, (C_out,), dtype) if bias else None
    got = emulated_convtr(emu, x, partial, w, b, stride, groups, elu, lanes, seed)
    want = _ext.conv_transpose1d_stream(x, partial, w, b, stride, groups, elu, stream=mx.cpu)
    what = f"emulated conv_transpose1d {shape} elu={elu} bias={bias} lanes={lanes}"
    for name, g, c in zip(("y", "partial'"), got, want):
        assert_close(g, c, TOL[dtype], f"{what}: {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", CONVTRS)
def test_conv_transpose1d_stream_kernels(codec_emulator, shape, dtype):
    for i, (elu, bias) in enumerate([(False, True), (True, True), (True, False), (False, False)]):
        check_convtr(codec_emulator["conv_transpose1d_stream"], shape, dtype, elu, bias, seed=i)


@pytest.mark.parametrize("lanes", [1, 2, 4, 8, 16, 32])
def test_conv_transpose1d_stream_any_lane_count(codec_emulator, lanes):
    check_convtr(codec_emulator["conv_transpose1d_stream"], (3, 20, 6, 6, 2, 2), mx.float32, True,
                 True, lanes)


# ------------------------------------------------------------------------------- rvq


def emulated_rvq(emu, x, books, codes, seed, vectors=0):
    """Encodes x [..., D] (converted to float32 first, as the host does) and decodes
    `codes` [..., n_q]. vectors: the encoder's vectors per block, 0 for the host's."""
    n_q, bins, D = books.shape
    xr = raw(x.astype(mx.float32).reshape(-1, D))
    br, cr = raw(books), raw(codes.reshape(-1, n_q))
    n = xr.shape[0]
    got_codes = raw(mx.full((n, n_q), -1, mx.int32))
    check(emu, emu.emu_rvq_encode(ptr(xr), ptr(br), ptr(got_codes),
                                  ctypes.byref(RvqArgs(n, n_q, bins, D)), seed, vectors))
    out = nan_raw((cr.shape[0], D), mx.float32)
    check(emu, emu.emu_rvq_decode(ptr(cr), ptr(br), ptr(out),
                                  ctypes.byref(RvqArgs(cr.shape[0], n_q, bins, D)), seed))
    return got_codes.reshape(*x.shape[:-1], n_q), out.view(np.float32).reshape(*codes.shape[:-1], D)


# (leading shape of x, n_q, bins, D): bins not a multiple of the encoder's 64-bin
# chunks, D below, at and past the dot's 8 lanes, and past a thread's batch of 8
# loads (70: one batch; 3100: many, and a remainder); n_q = 1, more codebooks than
# the block's 8 warps (9, 10), more chunks than blocks (16400 bins: S = 256, two
# chunks for some blocks), no vectors, vector counts that leave the last block of
# 2 or 4 vectors partial (3, 5, 6, 7, 9, 10), and a D whose residuals make the
# host halve its vectors per block (3100: 4 would pass 48 KB).
RVQ_SHAPES = [((6,), 4, 33, 3), ((2, 5), 8, 128, 20), ((3, 2), 1, 64, 32), ((2, 3), 3, 600, 13),
              ((4,), 8, 1100, 8), ((3,), 10, 70, 9), ((1,), 2, 16400, 3), ((2,), 3, 200, 16),
              ((0,), 2, 40, 9), ((5,), 2, 100, 3100), ((3,), 2, 90, 70), ((7,), 3, 150, 13),
              ((3, 3), 9, 64, 24)]


def rvq_case(shape, dtype):
    lead, n_q, bins, D = shape
    rng = np.random.default_rng(hash((shape, str(dtype))) % 2**32)
    books = mx.array(np.stack([0.6**q * rng.standard_normal((bins, D)) for q in range(n_q)])
                     .astype(np.float32))
    return rng, books, rand(rng, (*lead, D), dtype)


# Vectors per block: the host's choice (for an H100: 1 at these sizes), and each of
# the other kernels (rvq_encode_v2, _v4) whatever the host would take.
VECTORS = [0, 2, 4]


@pytest.mark.parametrize("vectors", VECTORS)
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("shape", RVQ_SHAPES)
def test_rvq_kernels(codec_emulator, shape, dtype, vectors):
    rng, books, x = rvq_case(shape, dtype)
    bins = shape[2]
    want = np.array(_ext.rvq_encode(x, books, stream=mx.cpu))
    # Decode the expected codes with every fifth one out of range (clamped).
    c = want.copy()
    c.flat[::5] = rng.integers(-3, bins + 3, size=c.flat[::5].shape)
    codes, out = emulated_rvq(codec_emulator["rvq"], x, books, mx.array(c), 1, vectors)
    np.testing.assert_array_equal(codes, want)
    np.testing.assert_array_equal(out, np.array(_ext.rvq_decode(mx.array(c), books, stream=mx.cpu)))


@pytest.mark.parametrize("vectors", VECTORS)
def test_rvq_ties_go_to_the_lowest_bin(codec_emulator, vectors):
    """Small integer books and inputs, so that distances tie often; a bin copied to a
    higher one never wins, also where it is the exact match: of the same thread (3 to
    35: bin j of a 64-bin chunk goes to group j % 32 of eight threads, four groups a
    warp), of another group of the same warp (2 to 33), of another warp (3 to 17),
    of other blocks (2 to 650, 9 to 699, 11 to 661)."""
    rng = np.random.default_rng(2)
    n_q, bins, D = 3, 700, 5
    books = rng.integers(-3, 4, size=(n_q, bins, D)).astype(np.float32)
    for low, high in [(2, 650), (9, 699), (3, 17), (3, 35), (2, 33), (11, 661)]:
        books[:, high] = books[:, low]
    x = rng.integers(-4, 5, size=(2, 24, D)).astype(np.float32)
    x[0, :4] = books[0, [2, 9, 3, 11]]  # at distance 0 from a duplicated bin
    books, x = mx.array(books), mx.array(x)
    want = np.array(_ext.rvq_encode(x, books, stream=mx.cpu))
    codes, _ = emulated_rvq(codec_emulator["rvq"], x, books, mx.array(want), 3, vectors)
    np.testing.assert_array_equal(codes, want)
    assert not np.isin(codes, [650, 699, 17, 35, 33, 661]).any()


def rounding_case(rng, n_q, bins, D, n):
    """Codebooks whose entries are permutations of one vector of integers (|e|^2 exact
    in any order) and constant inputs near twice their mean (|r|^2 and 2 r.e of one
    size, |e|^2 below): every distance of codebook 0 is the same number but for the
    rounding of r.e, so the argmin shows any change in the order of the sums."""
    base = np.round(2.0 ** rng.uniform(0, 6, (n_q, D)))
    books = np.stack([[b[rng.permutation(D)] for _ in range(bins)] for b in base])
    x = np.repeat(2 * base[0].mean() * rng.uniform(0.9, 1.1, (n, 1)), D, axis=1)
    return mx.array(books.astype(np.float32)), mx.array(x.astype(np.float32))


@pytest.mark.parametrize("vectors", VECTORS)
def test_rvq_rounds_as_the_cpu_path(codec_emulator, vectors):
    books, x = rounding_case(np.random.default_rng(5), 2, 150, 37, 24)
    want = np.array(_ext.rvq_encode(x, books, stream=mx.cpu))
    assert len(np.unique(want[:, 0])) > 10  # rounding, not the data, picks the bins
    codes, _ = emulated_rvq(codec_emulator["rvq"], x, books, mx.array(want), 4, vectors)
    np.testing.assert_array_equal(codes, want)
