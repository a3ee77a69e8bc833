"""The shared GPU kernel bodies (kernels/*.cuh) run on the CPU through the
portability-layer emulator (tests/emulator), against the primitives' CPU paths.

CI has no GPU, so this is where a logic error in a kernel body shows first. The
kernels are launched as kernels/cuda/*.cu and the csrc/*_cuda.cpp hosts launch
them (tests/emulator/*.cpp; the codec kernels in tests/test_codec_emulator.py); outputs and workspaces start as NaN, so an
unwritten element fails the finiteness check. Tolerances are those of
tests/test_matvec.py and tests/test_ring_attention.py: the emulator sums in the
kernel's order, the CPU paths in theirs.

The drivers are compiled once per session with g++ (about 7 s on two cores).
"""

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext
from test_matvec import EPS, assert_matches, operands
from test_ring_attention import assert_close

ROOT = Path(__file__).resolve().parents[1]
DTYPE_CODE = {mx.float32: 0, mx.bfloat16: 1, mx.float16: 2}
BITS_OF = {mx.float32: mx.uint32, mx.bfloat16: mx.uint16, mx.float16: mx.uint16}


class MatvecArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("M", "K", "n_out", "norm", "gate", "residual")] + [
        ("eps", ctypes.c_float), ("early", ctypes.c_int)]


class RingArgs(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int) for n in ("B", "H", "T", "D", "W", "S", "copy_k", "copy_v", "rope")]
                + [(n, ctypes.c_float) for n in ("rope_step", "scale")]
                + [(n, ctypes.c_long) for n in ("new_b", "new_h", "new_t")]
                + [("chunk_window", ctypes.c_int)] + [(n, ctypes.c_long) for n in ("out_b", "out_h", "out_t")])


def build_drivers(build, names):
    """tests/emulator/<name>.cpp for each name as shared libraries in `build`, compiled side
    by side. kernels/*.cuh are copied next to the emulator's portable.h, so that their
    `#include "portable.h"` finds it."""
    include = build / "include"
    include.mkdir()
    for f in (ROOT / "kernels").glob("*.cuh"):
        shutil.copy(f, include)
    shutil.copy(ROOT / "tests/emulator/portable_cpu.h", include / "portable.h")
    jobs = {}
    for name in names:
        cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-U_FORTIFY_SOURCE", "-DPP_EMULATE",
               "-shared", "-fPIC", f"-I{include}", str(ROOT / f"tests/emulator/{name}.cpp"), "-o",
               str(build / f"{name}.so")]
        jobs[name] = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    libs = {}
    for name, job in jobs.items():
        err = job.communicate()[1]
        assert job.returncode == 0, f"compiling tests/emulator/{name}.cpp failed:\n{err[-4000:]}"
        libs[name] = ctypes.CDLL(str(build / f"{name}.so"))
        libs[name].emu_error.restype = ctypes.c_char_p
    return libs


@pytest.fixture(scope="session")
def emulator(tmp_path_factory):
    return build_drivers(tmp_path_factory.mktemp("emulator"), ("matvec", "ring_attention"))


def raw(a):
    """The bits of an mx array as a numpy array on a 64-byte boundary (the kernels'
    16-byte loads need 16)."""
    bits = np.array(a.view(BITS_OF[a.dtype]) if a.dtype in BITS_OF else a)
    buf = np.empty(bits.nbytes + 64, np.uint8)
    start = -buf.ctypes.data % 64
    out = buf[start:start + bits.nbytes].view(bits.dtype).reshape(bits.shape)
    out[...] = bits
    return out


def nan_raw(shape, dtype):
    return raw(mx.full(shape, float("nan"), dtype=dtype))


def from_raw(bits, dtype):
    return mx.array(bits).view(dtype)


def ptr(a):
    return None if a is None else ctypes.c_void_p(a.ctypes.data)


def check(emu, rc):
    assert rc == 0, emu.emu_error().decode()


# --- matvec ------------------------------------------------------------------------

EPILOGUES = [(False, False, False), (True, False, False), (True, True, False), (False, False, True),
             (True, True, True), (False, True, True)]


def emulated_matvec(emu, x, w, scales, biases, alpha, res, bits, gate, seed, early=0):
    M, K = x.shape
    n_out = w.shape[0] // 2 if gate else w.shape[0]
    out = nan_raw((M, n_out), x.dtype)
    args = MatvecArgs(M, K, n_out, alpha is not None, gate, res is not None, EPS, early)
    operands_ = [None if a is None else raw(a) for a in (x, w, scales, biases, alpha, res)]
    check(emu, emu.emu_matvec(DTYPE_CODE[x.dtype], bits, *map(ptr, operands_), ptr(out),
                              ctypes.byref(args), seed))
    return from_raw(out, x.dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [0, 4, 8])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 11])  # the kernel's x tiles MT = 1, 2, 4, 8; 11: two tiles
@pytest.mark.parametrize("early", [0, 1])
def test_matvec_kernel(emulator, dtype, bits, M, early):
    """The streaming kernel against the CPU path; early: each thread's first chunk of weights
    loaded before the wait for the kernel before (MatvecArgs::early, the CUDA default;
    PERSONAPLEX_MATVEC_EARLY=0 turns it off), x NaN until the wait either way (the emulator's driver)."""
    rng = np.random.default_rng(hash((str(dtype), bits, M, early)) % 2**32)
    # 18 rows: a last block only half full, gated or not. K = 4160 takes every thread
    # through the K loop twice with most of them idle the second time (q4: 32
    # weights a thread); 256 leaves most threads without any weights.
    K = 4160 if M == 3 else 256
    for i, (norm, gate, residual) in enumerate(EPILOGUES):
        x, w, scales, biases, _, alpha, res = operands(rng, M, K, 18, dtype, bits, norm, gate, residual)
        got = emulated_matvec(emulator["matvec"], x, w, scales, biases, alpha, res, bits, gate, i, early)
        want = _ext.matvec(x, w, scales, biases, alpha, res, bits, gate, EPS, stream=mx.cpu)
        assert_matches(got, np.array(want.astype(mx.float32)).astype(np.float64), dtype,
                       f"emulated matvec norm={norm} gate={gate} residual={residual}", res)


# --- matvec, tensor-core path ---------------------------------------------------------


def emulated_matvec_tc(emu, x, w, scales, biases, alpha, res, bits, gate, sms, seed):
    M, K = x.shape
    n_out = w.shape[0] // 2 if gate else w.shape[0]
    out = nan_raw((M, n_out), x.dtype)
    args = MatvecArgs(M, K, n_out, alpha is not None, gate, res is not None, EPS)
    operands_ = [None if a is None else raw(a) for a in (x, w, scales, biases, alpha, res)]
    splits = ctypes.c_int(0)
    check(emu, emu.emu_matvec_tc(DTYPE_CODE[x.dtype], bits, *map(ptr, operands_), ptr(out), ctypes.byref(args),
                                 sms, seed, ctypes.byref(splits)))
    return from_raw(out, x.dtype), splits.value


def check_tc_variant(emu, rng, M, K, sms, dtype, bits, epilogue, seed, what):
    """One emulated tensor-core call (the kernel the environment picks) of fresh operands with
    150 weight rows against the emulation with W rounded to T; returns its split count."""
    from test_matvec import emulate, round_to

    norm, gate, residual = epilogue
    x, w, scales, biases, W, alpha, res = operands(rng, M, K, 150, dtype, bits, norm, gate, residual)
    got, splits = emulated_matvec_tc(emu, x, w, scales, biases, alpha, res, bits, gate, sms=sms, seed=seed)
    want = emulate(x, round_to(W, dtype) if bits else W, dtype, alpha, gate, res)
    assert_matches(got, want, dtype, f"emulated matvec_tc {what} M={M} K={K} norm={norm} gate={gate}", res)
    return splits


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits", [0, 4, 8])
# n8 tiles NT = 1, 1, 4 (17 -> 3 rows of x past M), 8, 8; 130: chunks of 64, 64 and 2 rows
@pytest.mark.parametrize("M", [1, 3, 17, 40, 64, 130])
def test_matvec_tc_kernel(emulator, dtype, bits, M):
    """The tensor-core body (mma emulated with the PTX fragment layout) against the
    numpy emulation of the reference with W as mx.dequantize gives it (rounded to T),
    split along K in 2 or 3, outputs and workspace NaN first. 150 weight rows: a second
    block of 8 warps, mostly past the end (gated: 75 units over two blocks of 64)."""
    rng = np.random.default_rng(hash((str(dtype), bits, M, "tc")) % 2**32)
    for i, epilogue in enumerate(EPILOGUES if M in (3, 64, 130) else EPILOGUES[2:3]):
        splits = check_tc_variant(emulator["matvec"], rng, M, 768, 2, dtype, bits, epilogue, i, "default")
        assert splits in (2, 3), splits  # 3 steps of 256 split two or three ways


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("bits, ahead", [(0, "0"), (4, "0"), (8, "0"), (4, "1")])  # ahead: 4-bit weights only
@pytest.mark.parametrize("early", ["1", "0"])
def test_matvec_tc_early_weights(emulator, dtype, bits, ahead, early, monkeypatch):
    """The default (PERSONAPLEX_MATVEC_TC_EARLY unset or 1): the block's first step of
    weights loaded before the wait for the kernel before (programmatic dependent launch),
    its x and inv_rms only after: the emulator keeps x and inv_rms NaN until the wait (so any
    of them read early shows), at 1 to 64 rows, one split of 9 steps and 3 of 4, with the
    4-bit load-ahead kernel too; and with PERSONAPLEX_MATVEC_TC_EARLY=0, every load after it."""
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_EARLY", early)
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_AHEAD", ahead)
    rng = np.random.default_rng(hash((str(dtype), bits, ahead, early, "early")) % 2**32)
    for i, (M, K, sms, want) in enumerate([(1, 2304, 1, 1), (5, 3072, 3, 3), (8, 2304, 1, 1), (17, 3072, 3, 3),
                                           (64, 2304, 1, 1)]):
        if ahead == "1" and M > 8:
            continue
        epilogue = EPILOGUES[(i + bits) % len(EPILOGUES)]
        assert check_tc_variant(emulator["matvec"], rng, M, K, sms, dtype, bits, epilogue, i, "early") == want


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
@pytest.mark.parametrize("M", [1, 5, 8])
def test_matvec_tc_ahead_kernel(emulator, dtype, M, monkeypatch):
    """PERSONAPLEX_MATVEC_TC_AHEAD=1 (4-bit weights, up to 8 rows: the next step's weights
    and x loaded while a step multiplies, two register sets in turn): 9 steps of 256 in one
    split (an odd count: the last step has no successor) and 4 in each of 3, against the
    same emulation as the default kernel."""
    monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_AHEAD", "1")
    rng = np.random.default_rng(hash((str(dtype), M, "ahead")) % 2**32)
    for i, (K, sms, want_splits) in enumerate([(2304, 1, 1), (3072, 3, 3)]):
        epilogue = EPILOGUES[(M + i) % len(EPILOGUES)]
        assert check_tc_variant(emulator["matvec"], rng, M, K, sms, dtype, 4, epilogue, i, "ahead") == want_splits


def test_matvec_tc_splits_rule(emulator, monkeypatch):
    """The split along K (kernels/matvec_tc.cuh, matvec_tc_splits) at the 7B's projections on
    132 multiprocessors of 2 blocks: the fewest waves times (steps a split + 1), fewer splits
    on a tie, where the earlier rule (`fill`, blocks for every slot) left a second wave of
    24 of 288 blocks (qkv) or 6 steps a block (ffn_out, 9 splits); a forced count is
    capped at the steps."""
    emu = emulator["matvec"]
    emu.emu_matvec_tc_splits.restype = ctypes.c_int
    # name: (blocks of 128 units, or 64 gated; 256-wide steps)
    shapes = {"qkv": (96, 16), "out": (32, 16), "ffn_in": (176, 16), "ffn_out": (32, 44), "dep_qkv": (24, 4)}

    def splits(rule):
        if rule is None:
            monkeypatch.delenv("PERSONAPLEX_MATVEC_TC_SPLITS", raising=False)
        else:
            monkeypatch.setenv("PERSONAPLEX_MATVEC_TC_SPLITS", rule)
        return {name: emu.emu_matvec_tc_splits(b, s, 264) for name, (b, s) in shapes.items()}

    assert splits(None) == {"qkv": 2, "out": 8, "ffn_in": 3, "ffn_out": 8, "dep_qkv": 4}
    assert splits("fill") == {"qkv": 3, "out": 9, "ffn_in": 2, "ffn_out": 9, "dep_qkv": 4}
    assert splits("6") == {"qkv": 6, "out": 6, "ffn_in": 6, "ffn_out": 6, "dep_qkv": 4}
    monkeypatch.delenv("PERSONAPLEX_MATVEC_TC_SPLITS")
    for blocks in (1, 7, 96, 500):
        for steps in (1, 3, 16, 44):
            n = emu.emu_matvec_tc_splits(blocks, steps, 264)
            assert 1 <= n <= steps
            per = -(-steps // n)
            cost = -(-blocks * -(-steps // per) // 264) * (per + 1)
            for m in range(1, steps + 1):  # no other count does better
                p = -(-steps // m)
                assert cost <= -(-blocks * -(-steps // p) // 264) * (p + 1), (blocks, steps, n, m)


@pytest.mark.parametrize("bits", [0, 4, 8])
def test_matvec_tc_x_tile_has_no_bank_conflicts(emulator, bits):
    """The x tile's swizzle (kernels/matvec_tc.cuh): every quarter of a warp's 16-byte
    fragment loads and tile stores hits 8 different bank groups, for each weight format's
    lane pattern (by this count, the unswizzled rows padded by 16 bytes took two wavefronts a load)."""
    emu = emulator["matvec"]
    load_max, store_max = ctypes.c_int(0), ctypes.c_int(0)
    check(emu, emu.emu_matvec_tc_wavefronts(bits, ctypes.byref(load_max), ctypes.byref(store_max)))
    assert (load_max.value, store_max.value) == (1, 1)


def test_matvec_tc_refuses_what_it_does_not_take(emulator):
    x = mx.zeros((5, 320), dtype=mx.bfloat16)
    w = mx.zeros((16, 320), dtype=mx.bfloat16)
    with pytest.raises(AssertionError, match="K a multiple of 256"):
        emulated_matvec_tc(emulator["matvec"], x, w, None, None, None, None, 0, False, 2, 0)
    x, w = x[:, :256], w[:, :256]
    with pytest.raises(AssertionError, match="bfloat16 or float16"):
        emulated_matvec_tc(emulator["matvec"], x[:4].astype(mx.float32), w.astype(mx.float32), None, None,
                           None, None, 0, False, 2, 0)


# --- ring_attention ------------------------------------------------------------------


def emulated_ring(emu, q, k, v, kc, vc, pos, rope_period, S, fused_qkv, donate, seed):
    """Runs attend + finish; q, k, v [B, H, T, D]. fused_qkv: they are read in place from
    the rows of one [B, T, 3, H, D] projection, as decoder_layers does."""
    B, H, T, D = q.shape
    W = kc.shape[2]
    dt = q.dtype
    if fused_qkv:
        qkv = raw(mx.stack([a.transpose(0, 2, 1, 3) for a in (q, k, v)], axis=2))
        step = qkv[0, 0, 1].ctypes.data - qkv.ctypes.data  # bytes from q to k
        qp, kp, vp = (ctypes.c_void_p(qkv.ctypes.data + i * step) for i in range(3))
        strides = (T * 3 * H * D, D, 3 * H * D)
    else:
        qkv = [raw(a) for a in (q, k, v)]
        qp, kp, vp = map(ptr, qkv)
        strides = (H * T * D, T * D, D)
    kcr, vcr = raw(kc), raw(vc)
    out = nan_raw((B, H, T, D), dt)
    # Donated caches are updated in place; otherwise finish copies them first.
    kc_out, vc_out = (kcr, vcr) if donate else (nan_raw(kc.shape, dt), nan_raw(vc.shape, dt))
    posr = np.ascontiguousarray(np.array(pos), dtype=np.int32)
    rope_step = -math.log(rope_period) * 2.0 / D if rope_period else 0.0
    args = RingArgs(B, H, T, D, W, S, not donate, not donate, bool(rope_period), rope_step,
                    1.0 / math.sqrt(D), *strides)
    check(emu, emu.emu_ring_attention(DTYPE_CODE[dt], qp, kp, vp, ptr(kcr), ptr(vcr), ptr(posr),
                                      ptr(out), ptr(kc_out), ptr(vc_out), ctypes.byref(args), seed))
    return tuple(from_raw(a, dt) for a in (out, kc_out, vc_out))


def rand(rng, shape, dtype):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16, mx.float16])
@pytest.mark.parametrize("D", [16, 32, 64, 128])  # every head dim the CUDA and Metal builds take
@pytest.mark.parametrize("T", [1, 4, 6])  # 6: a full and a partial group of 4 queries
def test_ring_attention_kernels(emulator, dtype, D, T):
    """Random caches and per-session positions (fresh, mid-ring, past the wrap), with
    and without RoPE, contiguous and fused-QKV inputs, donated and copied caches.
    The host picks the window splits S from the GPU's size, so S is swept."""
    rng = np.random.default_rng(hash((str(dtype), D, T)) % 2**32)
    B, H, W = 3, 2, 20
    cases = [(1, 10000.0, False, True), (2, None, True, False), (3, 10000.0, True, True),
             (7, 10000.0, False, False)]
    for i, (S, rope, fused_qkv, donate) in enumerate(cases):
        q, k, v = (rand(rng, (B, H, T, D), dtype) for _ in range(3))
        kc, vc = rand(rng, (B, H, W, D), dtype), rand(rng, (B, H, W, D), dtype)
        pos = mx.array(rng.choice([0, 1, W - 1, W, 3 * W + 2, 1000], size=B, replace=False),
                       dtype=mx.int32)
        got = emulated_ring(emulator["ring_attention"], q, k, v, kc, vc, pos, rope, S, fused_qkv, donate, i)
        want = _ext.ring_attention(q, k, v, kc, vc, pos, 1.0 / math.sqrt(D), rope or 0.0,
                                   stream=mx.cpu)
        max_pos = int(np.array(pos).max()) + T if rope else 0
        for name, a, b in zip(("out", "k_cache", "v_cache"), got, want):
            assert_close(a, b, dtype, f"emulated {name} S={S} rope={rope} fused_qkv={fused_qkv} "
                         f"donate={donate}", max_pos)
