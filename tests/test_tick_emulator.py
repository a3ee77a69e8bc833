"""The tick program's own kernel bodies (kernels/tick.cuh) on the CPU through the
portability-layer emulator (tests/emulator/tick.cpp), launched as csrc/tick_cuda.cpp
launches them, against the program's CPU path (one op, TickProgram.run_ops).

Integer kernels (the token rings, the resets, the counters) and the noise must
match bit for bit; the norms and GELU to the rounding of their storage type
(the block sums in another order). Outputs start as NaN (or -7 for integers), so
an unwritten element shows.
"""

import ctypes
import math

import mlx.core as mx
import numpy as np
import pytest

from personaplex_fast import _ext, reference
from test_kernel_emulator import DTYPE_CODE, RingArgs, build_drivers, check, from_raw, nan_raw, ptr, raw
from test_ring_attention import assert_close

DTYPES = [mx.float32, mx.bfloat16, mx.float16]
TOL = {mx.float32: 2e-6, mx.bfloat16: 1e-2, mx.float16: 2e-3}


class NormArgs(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int), ("dim", ctypes.c_int), ("eps", ctypes.c_float), ("layer", ctypes.c_int)]


class RowsArgs(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int), ("cols", ctypes.c_int)]


class FrameArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "n_q", "dep_q", "user_q", "n_sem", "R", "max_delay",
                                             "text_initial", "audio_initial", "card")]


class Im2colArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "T_out", "C_in", "K", "stride", "dilation", "rows")]


class Col2imArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "T", "C_out", "K", "stride", "has_bias")]


class GumbelArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("B", "V", "streams", "stream0")]


class FillRegion(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_long), ("row_bytes", ctypes.c_long), ("pattern", ctypes.c_uint)] + [
        (n, ctypes.c_int) for n in ("control_col", "mask", "pad")]


class UpdateEntry(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_long)] + [(n, ctypes.c_int) for n in ("count", "mode", "value", "pad")]


@pytest.fixture(scope="session")
def drivers(tmp_path_factory):
    return build_drivers(tmp_path_factory.mktemp("tick_emulator"), ("tick", "ring_attention"))


@pytest.fixture(scope="session")
def emu(drivers):
    return drivers["tick"]


def program_op(arrays, outputs, add):
    """A CPU program holding `arrays` (inputs, initialised) and `outputs` (shape, dtype:
    zeroed, or arrays for in-place operands), one op added by add(handles), run once.
    Returns the outputs' final contents."""
    p = _ext.TickProgram(False)
    handles = {}
    for name, a in {**arrays, **{k: v for k, v in outputs.items() if isinstance(v, mx.array)}}.items():
        a = mx.contiguous(a)
        mx.eval(a)
        handles[name] = p.buffer(a.nbytes, a.dtype)
        p.init(handles[name], a)
    for name, (shape, dtype) in ((k, v) for k, v in outputs.items() if not isinstance(v, mx.array)):
        handles[name] = p.buffer(int(np.prod(shape)) * dtype.size, dtype)
    add(p, handles)
    p.run_ops()
    out = {}
    for name, v in outputs.items():
        shape, dtype = (v.shape, v.dtype) if isinstance(v, mx.array) else v
        n = int(np.prod(shape)) * dtype.size
        out[name] = mx.array(np.array(p.read(handles[name], 0, n))).view(dtype).reshape(shape)
    return out


def close(got, want, dtype, what):
    g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
    assert np.isfinite(g).all(), f"{what}: unwritten output"
    np.testing.assert_allclose(g, w, rtol=TOL[dtype], atol=TOL[dtype], err_msg=what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [False, True])
def test_norm(emu, dtype, layer):
    rng = np.random.default_rng(1)
    rows, dim = 3, 300  # dim past one block's 256 threads
    x = mx.array(rng.standard_normal((rows, dim)) * 2 + 0.5).astype(dtype)
    w = mx.array(1 + 0.2 * rng.standard_normal(dim)).astype(dtype)
    b = mx.array(0.1 * rng.standard_normal(dim)).astype(dtype)
    want = program_op({"x": x, "w": w, "b": b}, {"out": ((rows, dim), dtype)},
                      lambda p, h: p.norm(x=h["x"], w=h["w"], b=h["b"] if layer else -1, out=h["out"], rows=rows,
                                          dim=dim, eps=1e-5))["out"]
    out = nan_raw((rows, dim), dtype)
    xr, wr, br = raw(x), raw(w), raw(b)  # held: ctypes keeps only the addresses
    check(emu, emu.emu_tick_norm(DTYPE_CODE[dtype], ptr(xr), ptr(wr), ptr(br) if layer else None,
                                 ptr(out), ctypes.byref(NormArgs(rows, dim, 1e-5, layer)), 7))
    close(from_raw(out, dtype), want, dtype, f"norm layer={layer}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_gelu_and_scale_add(emu, dtype, scaled):
    rng = np.random.default_rng(2)
    rows, cols = 5, 77
    x = mx.array(3 * rng.standard_normal((rows, cols))).astype(dtype)
    y = mx.array(rng.standard_normal((rows, cols))).astype(dtype)
    s = mx.array(0.1 * rng.standard_normal(cols)).astype(dtype)
    want = program_op({"x": x}, {"out": ((rows, cols), dtype)},
                      lambda p, h: p.gelu(x=h["x"], out=h["out"], rows=rows, cols=cols))["out"]
    out = nan_raw((rows, cols), dtype)
    xr, yr, sr = raw(x), raw(y), raw(s)
    check(emu, emu.emu_tick_gelu(DTYPE_CODE[dtype], ptr(xr), ptr(out), ctypes.byref(RowsArgs(rows, cols)), 3))
    close(from_raw(out, dtype), want, dtype, "gelu")
    want = program_op({"x": x, "y": y, "s": s}, {"out": ((rows, cols), dtype)},
                      lambda p, h: p.scale_add(x=h["x"], y=h["y"], out=h["out"], rows=rows, cols=cols,
                                               scale=h["s"] if scaled else -1))["out"]
    out = nan_raw((rows, cols), dtype)
    check(emu, emu.emu_tick_scale_add(DTYPE_CODE[dtype], ptr(xr), ptr(sr) if scaled else None, ptr(yr),
                                      ptr(out), ctypes.byref(RowsArgs(rows, cols)), 4))
    np.testing.assert_array_equal(np.array(from_raw(out, dtype).astype(mx.float32)),
                                  np.array(want.astype(mx.float32)))  # one rounding each: exact


def test_frame_in_and_out(emu):
    """Random rings and offsets (some before the delays, some wrapping), the LM's
    delays: every ring write and every read equal to the CPU path's."""
    rng = np.random.default_rng(3)
    B, n_q, dep_q, n_sem, R, max_delay, card = 5, 16, 8, 1, 4, 2, 64
    delays = np.array([0, 0] + [1] * 7 + [0] + [2] * 7, np.int32)
    n_ac = 7
    tokens = rng.integers(-2, card, (B, 1 + n_q, R)).astype(np.int32)
    forced = rng.integers(-1, card, (B, 1 + dep_q, R)).astype(np.int32)
    offsets = np.array([0, 1, 2, 7, 130], np.int32)
    sem = rng.integers(0, card, (B, n_sem)).astype(np.int32)
    ac = rng.integers(0, card, (B, n_ac)).astype(np.int32)
    gen = rng.integers(0, card + 5, (1 + dep_q, B)).astype(np.int32)  # some past the card: clamped
    args = dict(B=B, n_q=n_q, dep_q=dep_q, n_sem=n_sem, R=R, max_delay=max_delay, card=card)
    fin = dict(text_initial=1000, audio_initial=card)
    a = {k: mx.array(v) for k, v in dict(delays=delays, sem=sem, ac=ac, gen=gen).items()}
    want = program_op(a, {"tokens": mx.array(tokens), "forced": mx.array(forced), "offsets": mx.array(offsets),
                          "cur": ((1 + n_q, B), mx.int32), "now": ((1 + dep_q, B), mx.int32),
                          "out": ((B, 1 + dep_q), mx.int32), "dsem": ((B, n_sem), mx.int32),
                          "dac": ((B, dep_q - n_sem), mx.int32), "valid": ((B,), mx.int32)},
                      lambda p, h: (p.frame_in(tokens=h["tokens"], forced=h["forced"], offsets=h["offsets"],
                                               delays=h["delays"], sem=h["sem"], ac=h["ac"], cur=h["cur"],
                                               now=h["now"], n_ac=n_ac, **args, **fin),
                                    p.frame_out(tokens=h["tokens"], offsets=h["offsets"], delays=h["delays"],
                                                gen=h["gen"], out=h["out"], sem=h["dsem"], ac=h["dac"],
                                                valid=h["valid"], **args)))
    t, f, o = tokens.copy(), forced.copy(), offsets.copy()
    cur, now = np.full((1 + n_q, B), -7, np.int32), np.full((1 + dep_q, B), -7, np.int32)
    fa = FrameArgs(B, n_q, dep_q, n_q - dep_q, n_sem, R, max_delay, 1000, card, card)
    check(emu, emu.emu_tick_frame_in(ptr(t), ptr(f), ptr(o), ptr(delays), ptr(sem), ptr(ac), n_ac, ptr(cur),
                                     ptr(now), ctypes.byref(fa), 5))
    out = np.full((B, 1 + dep_q), -7, np.int32)
    dsem, dac = np.full((B, n_sem), -7, np.int32), np.full((B, dep_q - n_sem), -7, np.int32)
    valid = np.full(B, -7, np.int32)
    check(emu, emu.emu_tick_frame_out(ptr(t), ptr(o), ptr(delays), ptr(gen), ptr(out), ptr(dsem), ptr(dac),
                                      ptr(valid), ctypes.byref(fa), 6))
    for name, got in dict(tokens=t, forced=f, offsets=o, cur=cur, now=now, out=out, dsem=dsem, dac=dac,
                          valid=valid).items():
        np.testing.assert_array_equal(got, np.array(want[name]), err_msg=name)
    assert (valid == [0, 0, 1, 1, 1]).all() and (dac[valid == 1] < card).all()


def test_gumbel(emu):
    B, V, streams = 3, 37, 2  # V not a multiple of the 4 words a Philox call gives
    seeds = mx.array(np.array([1, 2**31 + 5, 7], np.uint32))
    offsets = mx.array(np.array([0, 9, 123456], np.int32))
    want = program_op({"seeds": seeds, "offsets": offsets}, {"out": ((streams, B, V), mx.float32)},
                      lambda p, h: p.gumbel(seeds=h["seeds"], offsets=h["offsets"], out=h["out"], B=B, V=V,
                                            streams=streams, stream0=3))["out"]
    out = np.full((streams, B, V), np.nan, np.float32)
    sn, on = np.array(seeds), np.array(offsets)
    check(emu, emu.emu_tick_gumbel(ptr(sn), ptr(on), ptr(out),
                                   ctypes.byref(GumbelArgs(B, V, streams, 3)), 2))
    np.testing.assert_array_equal(out, np.array(want))
    assert len(np.unique(out)) > 0.99 * out.size


def test_fill_update_and_mute(emu):
    """Resets by class bits (a pattern, a control value), counters and flags, mute."""
    B, cols = 4, 3
    p = _ext.TickProgram(False)
    control = p.buffer(B * cols * 4, mx.int32)
    a = p.buffer(B * 12, mx.int32)  # rows of 12 bytes
    flags = p.buffer(B, mx.uint8)
    seeds = p.buffer(B * 4, mx.int32)
    io = p.buffer(16, mx.float32)
    p.set_io(pcm_in=io, control=control, pcm_out=io, tokens=control, B=B, F=1, C=cols, G=1)
    p.reset_region(a, 12, 1, 0xFFFFFFFE)
    p.reset_region(flags, 1, 2, 0x01010101)
    p.reset_region(seeds, 4, 4, 0, 1)
    p.update_region(a, 3 * B, 0, 5)
    p.update_region(flags, B, 1, 0)
    ctrl = np.array([[1, 10, 0], [2, 11, 0], [0, 12, 0], [7, 13, 0]], np.int32)
    init = {"a": np.arange(3 * B, dtype=np.int32), "flags": np.full(B, 9, np.uint8),
            "seeds": np.full(B, 3, np.int32)}
    for h, v in ((control, ctrl), (a, init["a"]), (flags, init["flags"]), (seeds, init["seeds"])):
        p.write(h, 0, mx.array(v))
    p.run_ops()
    want = {"a": np.array(p.read(a, 0, 12 * B)).view(np.int32), "flags": np.array(p.read(flags, 0, B)),
            "seeds": np.array(p.read(seeds, 0, 4 * B)).view(np.int32)}
    np.testing.assert_array_equal(want["seeds"], [3, 3, 3, 13])
    np.testing.assert_array_equal(want["a"].reshape(B, 3)[:, 0], [3, 8, 11, 3])  # -2 + 5 where reset
    # The same on the emulator, over one arena holding the three regions.
    arena = np.zeros(96, np.uint8)  # a at 0 (48 bytes), flags at 48, seeds at 64
    arena[:12 * B].view(np.int32)[:] = init["a"]
    arena[12 * B:13 * B] = init["flags"]
    arena[64:64 + 4 * B].view(np.int32)[:] = init["seeds"]
    regions = (FillRegion * 3)(FillRegion(0, 12, 0xFFFFFFFE, -1, 1, 0), FillRegion(12 * B, 1, 0x01010101, -1, 2, 0),
                               FillRegion(64, 4, 0, 1, 4, 0))
    check(emu, emu.emu_tick_fill_rows(ptr(arena), regions, 3, ptr(ctrl), cols, B, 8))
    entries = (UpdateEntry * 2)(UpdateEntry(0, 3 * B, 0, 5, 0), UpdateEntry(12 * B, B, 1, 0, 0))
    check(emu, emu.emu_tick_update(ptr(arena), entries, 2, 3 * B, 9))
    np.testing.assert_array_equal(arena[:12 * B].view(np.int32), want["a"])
    np.testing.assert_array_equal(arena[12 * B:13 * B], want["flags"])
    np.testing.assert_array_equal(arena[64:64 + 4 * B].view(np.int32), want["seeds"])

    x = np.random.default_rng(4).standard_normal((B, 50)).astype(np.float32)
    valid = np.array([1, 0, 0, 1], np.int32)
    out = np.full_like(x, np.nan)
    check(emu, emu.emu_tick_mute(ptr(x), ptr(valid), ptr(out), ctypes.byref(RowsArgs(B, 50)), 10))
    np.testing.assert_array_equal(out, np.where(valid[:, None] == 1, x, 0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_chunk_window_and_out_strides(drivers, dtype):
    """Mimi's attention as the program runs it: q, k, v read from fused QKV rows
    [B, T, 3, H, D], every query's window ending at the chunk's last position,
    out written as [B, T, H, D] rows, caches updated in place."""
    rng = np.random.default_rng(7)
    B, H, T, D, W = 3, 2, 2, 16, 9
    qkv = mx.array(rng.standard_normal((B, T, 3, H, D)).astype(np.float32)).astype(dtype)
    kc = mx.array(rng.standard_normal((B, H, W, D)).astype(np.float32)).astype(dtype)
    vc = mx.array(rng.standard_normal((B, H, W, D)).astype(np.float32)).astype(dtype)
    pos = mx.array(np.array([0, 8, 30], np.int32))  # fresh, just before the wrap, wrapped
    es = dtype.size
    strides = [T * 3 * H * D, D, 3 * H * D]
    out_strides = [T * H * D, D, H * D]
    want = program_op({"qkv": qkv, "pos": pos}, {"kc": kc, "vc": vc, "out": ((B, T, H, D), dtype)},
                      lambda p, h: p.attention(q=h["qkv"], k=p.view(h["qkv"], H * D * es, dtype),
                                               v=p.view(h["qkv"], 2 * H * D * es, dtype), k_cache=h["kc"],
                                               v_cache=h["vc"], pos=h["pos"], out=h["out"], B=B, H=H, T=T, D=D, W=W,
                                               new_strides=strides, out_strides=out_strides,
                                               rope_max_period=10000.0, chunk_window=True))
    qr, kcr, vcr = raw(qkv), raw(kc), raw(vc)
    posr = np.array(pos)
    out = nan_raw((B, T, H, D), dtype)
    step = H * D * es
    qp, kp, vp = (ctypes.c_void_p(qr.ctypes.data + i * step) for i in range(3))
    args = RingArgs(B, H, T, D, W, 2, 0, 0, 1, -math.log(10000.0) * 2.0 / D, 1.0 / math.sqrt(D), *strides, 1,
                    *out_strides)
    check(drivers["ring_attention"], drivers["ring_attention"].emu_ring_attention(
        DTYPE_CODE[dtype], qp, kp, vp, ptr(kcr), ptr(vcr), ptr(posr), ptr(out), ptr(kcr), ptr(vcr),
        ctypes.byref(args), 11))
    for name, got in (("out", out), ("kc", kcr), ("vc", vcr)):
        assert_close(from_raw(got, dtype), want[name], dtype, f"chunk-window attention {name}", 40)


def quantized(rng, shape, dtype):
    """An 8-bit ring [B, H, W, D] of random rows: (int8 codes, float32 scales)."""
    return reference.quantize_rows(mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [16, 128])  # 128: two pairs a lane in finish's quantizing warp
def test_attention_8bit_ring(drivers, dtype, D):
    """The 8-bit ring's kernels (ring::Int8Rows: int8 codes, a float32 scale per row)
    against the program's CPU path: a decode step from fused QKV rows in place (as the
    LM runs it), chunks of a partial query group and longer than the ring, with and
    without RoPE, window splits swept, and once with the caches copied first. The codes
    and scales must be the CPU path's bit for bit (the same rounding), out to the dtype."""
    rng = np.random.default_rng(D)
    B, H, W = 3, 2, 20
    emu = drivers["ring_attention"]
    for i, (T, S, rope, in_place) in enumerate([(1, 1, 10000.0, True), (1, 3, None, True), (6, 2, 10000.0, True),
                                                (23, 1, 10000.0, True), (1, 7, 10000.0, False)]):
        qkv = mx.array(rng.standard_normal((B, T, 3, H, D)).astype(np.float32)).astype(dtype)
        (kc, ks), (vc, vs) = quantized(rng, (B, H, W, D), dtype), quantized(rng, (B, H, W, D), dtype)
        pos = mx.array(rng.choice([0, 1, W - 1, W, 3 * W + 2, 1000], size=B, replace=False).astype(np.int32))
        es = dtype.size
        strides = [T * 3 * H * D, D, 3 * H * D]
        want = program_op({"qkv": qkv, "pos": pos}, {"kc": kc, "vc": vc, "ks": ks, "vs": vs,
                                                     "out": ((B, H, T, D), dtype)},
                          lambda p, h: p.attention(q=h["qkv"], k=p.view(h["qkv"], H * D * es, dtype),
                                                   v=p.view(h["qkv"], 2 * H * D * es, dtype), k_cache=h["kc"],
                                                   v_cache=h["vc"], pos=h["pos"], out=h["out"], B=B, H=H, T=T, D=D,
                                                   W=W, new_strides=strides, rope_max_period=rope or 0.0,
                                                   k_scales=h["ks"], v_scales=h["vs"]))
        qr, posr = raw(qkv), np.array(pos)
        ins = [np.array(a) for a in (kc, vc, ks, vs)]
        outs = ins if in_place else [np.full_like(a, -99 if a.dtype == np.int8 else np.nan) for a in ins]
        out = nan_raw((B, H, T, D), dtype)
        step = H * D * es
        qp, kp, vp = (ctypes.c_void_p(qr.ctypes.data + j * step) for j in range(3))
        args = RingArgs(B, H, T, D, W, S, not in_place, not in_place, bool(rope),
                        -math.log(rope) * 2.0 / D if rope else 0.0, 1.0 / math.sqrt(D), *strides)
        check(emu, emu.emu_ring_attention_i8(DTYPE_CODE[dtype], qp, kp, vp, *map(ptr, ins), ptr(posr), ptr(out),
                                             *map(ptr, outs), ctypes.byref(args), 20 + i))
        what = f"8-bit ring T={T} S={S} rope={rope} in_place={in_place}"
        assert_close(from_raw(out, dtype), want["out"], dtype, f"{what}: out", int(posr.max()) + T)
        for name, got in zip(("kc", "vc", "ks", "vs"), outs):
            np.testing.assert_array_equal(got, np.array(want[name]), err_msg=f"{what}: {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_gate(emu, dtype):
    rng = np.random.default_rng(12)
    rows, n = 3, 40
    x = mx.array(2 * rng.standard_normal((rows, 2 * n))).astype(dtype)
    want = program_op({"x": x}, {"out": ((rows, n), dtype)},
                      lambda p, h: p.gate(x=h["x"], out=h["out"], rows=rows, cols=n))["out"]
    out, xr = nan_raw((rows, n), dtype), raw(x)
    check(emu, emu.emu_tick_gate(DTYPE_CODE[dtype], ptr(xr), ptr(out), ctypes.byref(RowsArgs(rows, n)), 5))
    close(from_raw(out, dtype), want, dtype, "gate")


def gathered(x, prev, elu):
    """The conv's inputs [B, context + T, C] as the gather kernel builds them (float32)."""
    xe = np.where(x > 0, x, np.expm1(np.minimum(x, 0))) if elu else x
    return np.concatenate([prev, xe], axis=1)


@pytest.mark.parametrize("K,stride,dilation", [(7, 1, 1), (3, 1, 2), (8, 4, 1), (1, 1, 1)])
def test_conv_as_im2col_gemm(emu, K, stride, dilation):
    """im2col (+ bias rows) and a GEMM of the windows by the weights [C_out, K * C_in]:
    the conv1d op's CPU result (float32)."""
    rng = np.random.default_rng(K * 10 + stride)
    B, T, C_in, C_out = 2, 16, 5, 6
    ctx = (K - 1) * dilation + 1 - stride
    x = rng.standard_normal((B, T, C_in)).astype(np.float32)
    prev = rng.standard_normal((B, ctx, C_in)).astype(np.float32)
    w = rng.standard_normal((C_out, K, C_in)).astype(np.float32)
    bias = rng.standard_normal(C_out).astype(np.float32)
    want = program_op({"x": mx.array(x), "w": mx.array(w), "bias": mx.array(bias)},
                      {"state": mx.array(prev), "y": ((B, T // stride, C_out), mx.float32)},
                      lambda p, h: p.conv1d(x=h["x"], state=h["state"] if ctx else -1, w=h["w"], y=h["y"], B=B,
                                            T=T, C_in=C_in, C_out=C_out, K=K, stride=stride, dilation=dilation,
                                            elu=True, bias=h["bias"]))["y"]
    buf = np.ascontiguousarray(gathered(x, prev, True))
    T_out = T // stride
    cols = np.full((B * T_out, K * C_in), np.nan, np.float32)
    check(emu, emu.emu_tick_im2col(0, ptr(buf), ptr(cols), ctypes.byref(Im2colArgs(B, T_out, C_in, K, stride,
                                                                                   dilation, ctx + T)), 3))
    y = np.full((B * T_out, C_out), np.nan, np.float32)
    check(emu, emu.emu_tick_bias_rows(0, ptr(bias), ptr(y), ctypes.byref(RowsArgs(B * T_out, C_out)), 4))
    y += cols @ w.reshape(C_out, K * C_in).T
    np.testing.assert_allclose(y.reshape(B, T_out, C_out), np.array(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K,stride", [(4, 2), (16, 8), (10, 5)])
def test_conv_transpose_as_gemm_col2im(emu, K, stride):
    """A GEMM of x by the weights as [K * C_out, C_in], then col2im's overlap-add with
    the carried partial and the bias: the conv_transpose1d op's CPU result and its
    next partial (float32)."""
    rng = np.random.default_rng(K)
    B, T, C_in, C_out = 2, 3, 5, 4
    overlap = K - stride
    x = rng.standard_normal((B, T, C_in)).astype(np.float32)
    partial = rng.standard_normal((B, overlap, C_out)).astype(np.float32)
    w = rng.standard_normal((C_out, K, C_in)).astype(np.float32)
    bias = rng.standard_normal(C_out).astype(np.float32)
    want = program_op({"x": mx.array(x), "w": mx.array(w), "bias": mx.array(bias)},
                      {"partial": mx.array(partial), "y": ((B, T * stride, C_out), mx.float32)},
                      lambda p, h: p.conv_transpose1d(x=h["x"], partial=h["partial"], w=h["w"], y=h["y"], B=B, T=T,
                                                      C_in=C_in, C_out=C_out, K=K, stride=stride, bias=h["bias"]))
    z = np.ascontiguousarray(x.reshape(B * T, C_in) @ w.transpose(1, 0, 2).reshape(K * C_out, C_in).T)
    y = np.full((B, T * stride, C_out), np.nan, np.float32)
    nxt = np.full((B, overlap, C_out), np.nan, np.float32)
    check(emu, emu.emu_tick_col2im(0, ptr(z), ptr(partial), ptr(bias), ptr(y), ptr(nxt),
                                   ctypes.byref(Col2imArgs(B, T, C_out, K, stride, 1)), 6))
    np.testing.assert_allclose(y, np.array(want["y"]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nxt, np.array(want["partial"]), rtol=1e-5, atol=1e-5)


def test_gemm_op_cpu():
    rng = np.random.default_rng(13)
    x = rng.standard_normal((3, 24)).astype(np.float32)
    w = rng.standard_normal((7, 24)).astype(np.float32)
    y0 = rng.standard_normal((3, 7)).astype(np.float32)
    for acc in (False, True):
        got = program_op({"x": mx.array(x), "w": mx.array(w)}, {"y": mx.array(y0)},
                         lambda p, h: p.gemm(x=h["x"], w=h["w"], y=h["y"], M=3, N=7, K=24, accumulate=acc))["y"]
        np.testing.assert_allclose(np.array(got), x @ w.T + (y0 if acc else 0), rtol=1e-5, atol=1e-5)
