"""The whole frame as one program: Mimi encode, the LM step and Mimi decode of
every session, described once as a list of our kernels (csrc/tick.h) and run by
one primitive per tick.

This file walks the models and adds the ops, in the order the per-op path
(engine.Engine without a program: Mimi.encode_step, LM.step, Mimi.decode_step)
computes them, with the same kernels and the same rounding, so that on the CPU a
program tick equals a per-op tick given the same tokens (tests/test_tick.py). The
sessions' streaming state lives in the program's arena:

    LM      KV rings, token and forced-token rings, frame offsets, seeds
    codec   every conv's left context and every transposed conv's overlap, the
            downsampler's first-sample flags, both transformers' KV rings and
            step offsets

A reset (control column 0, a bit set of RESET_*) refills a session's rows before
the tick; a prompted session's LM rows are written in between ticks instead
(TickRunner.load_lm_row). Sampling noise comes from the program itself (Philox,
per session seed and frame), so sampled tokens differ from the per-op path's
(mx.random); greedy picks are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import ops
from .models.lm import LM, LMState, NOT_FORCED, UNGENERATED
from .models.mimi import Mimi
from .models.mimi_layers import CausalConv1d, CausalConvTranspose1d
from .sampling import SamplingConfig

RESET_LM = 1  # offsets, token rings, forced rings
RESET_CODEC = 2  # every codec state
RESET_SEED = 4  # the session's sampling seed, from control column 1
RESET_ALL = RESET_LM | RESET_CODEC | RESET_SEED

CONTROL_COLS = 2  # reset bits, seed

# On a GPU, dense projections of this many rows (sessions, or sessions x codec steps)
# or more run as a cuBLAS GEMM (with the norm and gate as ops of their own) rather than
# as matvec, which streams the weights once per 8 rows; and codec convs of more than
# this many multiply-adds per tick as im2col + GEMM rather than the direct kernel.
# Both forms compute the same function (tests/gpu/test_tick_gpu.py); docs/PERF.md has
# the measurements behind the numbers.
GEMM_MIN_ROWS = 4
# ... unless the weights are smaller than this and the rows at most 8 (matvec's tile):
# the depformer's and the codec's small weights (0: always the GEMM at GEMM_MIN_ROWS).
GEMM_MIN_BYTES = 0
CONV_GEMM_MIN_MACS = 4_000_000


class Unsupported(ValueError):
    """The models use something the program does not implement (the per-op path runs them)."""


def supported(lm: LM, mimi: Mimi, gpu: bool) -> str | None:
    """Why the program cannot run these models, or None when it can."""
    cfg = lm.cfg
    if cfg.norm != "rms_norm_f32":
        return f"norm {cfg.norm!r} (the program fuses rms_norm_f32 only)"
    if mimi.dtype != mx.float32:
        return "Mimi weights not in float32"
    if lm.dtype not in (mx.float32, mx.bfloat16, mx.float16):
        return f"LM dtype {lm.dtype}"
    for layer in list(lm.transformer.layers) + list(lm.depformer.layers):
        if not (layer.norm1.f32 and layer.norm2.f32):
            return "a layer norm not in float32"
    heads = {cfg.head_dim, cfg.depformer.head_dim, mimi.cfg.transformer.d_model // mimi.cfg.transformer.num_heads}
    if gpu and not heads <= {16, 32, 64, 128}:
        return f"head dims {sorted(heads)} (16, 32, 64 or 128)"
    return None


@dataclass
class LMHandles:
    """The program's LM state, for loading a prompted session's rows."""

    keys: list[int]
    values: list[int]
    offsets: int
    tokens: int
    forced: int


class Builder:
    """Adds ops to a TickProgram; tracks handles, weights and state regions."""

    def __init__(self, slots: int, gpu: bool, gemm_forms: bool | None = None):
        """gemm_forms: build the GPU's GEMM forms of projections and convs (default: on a
        GPU); on the CPU their ops compute the same functions (tests of the builder)."""
        from . import _ext

        self.p = _ext.TickProgram(gpu)
        self.B = slots
        self.gpu = gpu if gemm_forms is None else gemm_forms
        self._scratch: dict[tuple, int] = {}
        self._dtypes: dict[int, mx.Dtype] = {}
        self._weights: dict[int, int] = {}
        self._keep: list[mx.array] = []
        self.updates: list[tuple[int, int, int, int]] = []
        self.resets: list[tuple[int, int, int, int, int]] = []

    def buf(self, shape, dtype, *, reset: int = 0, pattern: int = 0, control_col: int = -1) -> int:
        """An arena region of `shape`; reset: the RESET_* class whose sessions' rows
        (shape[0] == B) are refilled with `pattern` (or their control value)."""
        nbytes = math.prod(shape) * dtype.size
        h = self.p.buffer(nbytes, dtype)
        self._dtypes[h] = dtype
        if reset:
            self.resets.append((h, nbytes // shape[0], reset, pattern, control_col))
        return h

    def const(self, values: np.ndarray) -> int:
        """A region holding `values` (int32 or float32), never written by the ops."""
        a = mx.array(values)
        mx.eval(a)
        h = self.p.buffer(a.nbytes, a.dtype)
        self._dtypes[h] = a.dtype
        self.p.init(h, a)
        return h

    def w(self, a: mx.array | None) -> int:
        """The handle of a weight (once per array)."""
        if a is None:
            return -1
        key = id(a)
        if key not in self._weights:
            c = mx.contiguous(a)
            mx.eval(c)
            self._keep.append(a)  # ids stay unique while the array lives
            self._weights[key] = self.p.weight(c)
        return self._weights[key]

    def view(self, h: int, offset_bytes: int, dtype) -> int:
        v = self.p.view(h, offset_bytes, dtype)
        self._dtypes[v] = dtype
        return v

    def shared(self, name: str, shape, dtype) -> int:
        """A scratch region for one op's intermediate, shared by every op asking for the
        same (name, shape, dtype): the ops run one after another."""
        key = (name, tuple(shape), dtype)
        if key not in self._scratch:
            self._scratch[key] = self.buf(shape, dtype)
        return self._scratch[key]

    def project(self, layer: nn.Module, x: int, out: int, M: int, K: int, n_out: int, *, norm=None,
                gate: bool = False, residual: bool = False) -> None:
        """out [M, n_out] = [silu-gate of] layer(norm(x)) [+ out]: one matvec, or on a GPU
        at GEMM_MIN_ROWS rows and more with dense weights, [norm,] a cuBLAS GEMM [, gate].
        norm: an RMSNorm module (float32, as matvec's prologue); residual: in place into out."""
        proj = _proj(layer)
        w, scales, biases, bits = proj.w, proj.scales, proj.biases, proj.bits
        dt = self.p_dtype(x)
        if self.gpu and bits == 0 and M >= GEMM_MIN_ROWS and (M > 8 or w.nbytes >= GEMM_MIN_BYTES):
            src = x
            if norm is not None:
                src = self.shared("normed", (M, K), dt)
                self.p.norm(x=x, w=self.w(_cast(norm.alpha, dt)), out=src, rows=M, dim=K, eps=norm.eps)
            if gate:
                both = self.shared("gated", (M, 2 * n_out), dt)
                self.p.gemm(x=src, w=self.w(w), y=both, M=M, N=2 * n_out, K=K)
                self.p.gate(x=both, out=out, rows=M, cols=n_out)
            else:
                self.p.gemm(x=src, w=self.w(w), y=out, M=M, N=n_out, K=K, accumulate=residual)
            return
        self.p.matvec(x=x, w=self.w(w), scales=self.w(scales), biases=self.w(biases), out=out, M=M, K=K,
                      n_out=n_out, bits=bits, gate=gate, residual=out if residual else -1,
                      alpha=-1 if norm is None else self.w(_cast(norm.alpha, dt)),
                      eps=1e-8 if norm is None else norm.eps)

    def p_dtype(self, h: int):
        return self._dtypes[h]

    def finish(self) -> None:
        for h, row, mask, pattern, col in self.resets:
            self.p.reset_region(h, row, mask, pattern & 0xFFFFFFFF, col)
        for h, count, mode, value in self.updates:
            self.p.update_region(h, count, mode, value)


# ------------------------------------------------------------------------------- codec


def _conv(b: Builder, conv: CausalConv1d, x: int, T: int, elu: bool, dtype) -> tuple[int, int]:
    """One streaming conv of B sessions over T new steps: (y, T out)."""
    C_out, K, C_in = conv.weight.shape
    B, stride = b.B, conv.stride
    state = b.buf((B, conv.context, C_in), dtype, reset=RESET_CODEC) if conv.context else -1
    first = -1
    if conv.replicate:
        first = b.buf((B,), mx.uint8, reset=RESET_CODEC, pattern=0x01010101)
        b.updates.append((first, B, 1, 0))
    y = b.buf((B, T // stride, C_out), dtype)
    gemm = b.gpu and B * (T // stride) * C_out * K * C_in > CONV_GEMM_MIN_MACS
    b.p.conv1d(x=x, state=state, w=b.w(conv.weight), y=y, B=B, T=T, C_in=C_in, C_out=C_out, K=K,
               stride=stride, dilation=conv.dilation, elu=elu,
               bias=b.w(conv.bias) if "bias" in conv else -1, first=first, gemm=gemm)
    return y, T // stride


def _convtr(b: Builder, conv: CausalConvTranspose1d, x: int, T: int, elu: bool, dtype) -> tuple[int, int]:
    C_out, K, cin_g = conv.weight.shape
    B = b.B
    partial = b.buf((B, conv.overlap, C_out), dtype, reset=RESET_CODEC)
    y = b.buf((B, T * conv.stride, C_out), dtype)
    C_in = cin_g * conv.groups
    w_t = -1
    if b.gpu and conv.groups == 1 and B * T * K * C_out * C_in > CONV_GEMM_MIN_MACS:
        w_t = b.w(mx.contiguous(conv.weight.transpose(1, 0, 2)))  # [K, C_out, C_in]: one GEMM over the taps
    b.p.conv_transpose1d(x=x, partial=partial, w=b.w(conv.weight), y=y, B=B, T=T, C_in=C_in,
                         C_out=C_out, K=K, stride=conv.stride, groups=conv.groups, elu=elu,
                         bias=b.w(conv.bias) if "bias" in conv else -1, w_t=w_t)
    return y, T * conv.stride


def _residual_unit(b: Builder, unit, x: int, T: int, dtype) -> int:
    h, _ = _conv(b, unit.conv1, x, T, True, dtype)
    r, _ = _conv(b, unit.conv2, h, T, True, dtype)
    C = unit.conv2.weight.shape[0]
    b.p.scale_add(x=x, y=r, out=x, rows=b.B * T, cols=C)
    return x


def _mimi_transformer(b: Builder, tr, x: int, T: int, dtype) -> None:
    """The codec's transformer over x [B, T, d] in place (T steps of one frame)."""
    cfg = tr.cfg
    B, d, H = b.B, cfg.d_model, cfg.num_heads
    D, es = d // H, dtype.size
    offset = b.buf((B,), mx.int32, reset=RESET_CODEC)
    b.updates.append((offset, B, 0, T))
    rows = B * T
    h = b.buf((rows, d), dtype)
    qkv = b.buf((rows, 3 * d), dtype)
    attn = b.buf((rows, d), dtype)
    o = b.buf((rows, d), dtype)
    f = b.buf((rows, cfg.dim_feedforward), dtype)
    for layer in tr.layers:
        b.p.norm(x=x, w=b.w(layer.attn_norm.weight), b=b.w(layer.attn_norm.bias), out=h, rows=rows, dim=d,
                 eps=layer.attn_norm.eps)
        b.project(layer.in_proj, h, qkv, rows, d, 3 * d)
        kc = b.buf((B, H, cfg.context, D), dtype)
        vc = b.buf((B, H, cfg.context, D), dtype)
        b.p.attention(q=qkv, k=b.view(qkv, d * es, dtype), v=b.view(qkv, 2 * d * es, dtype), k_cache=kc,
                      v_cache=vc, pos=offset, out=attn, B=B, H=H, T=T, D=D, W=cfg.context,
                      new_strides=[T * 3 * d, D, 3 * d], out_strides=[T * d, D, d],
                      rope_max_period=cfg.max_period, chunk_window=True)
        b.project(layer.out_proj, attn, o, rows, d, d)
        b.p.scale_add(x=x, y=o, out=x, rows=rows, cols=d, scale=b.w(layer.attn_scale))
        b.p.norm(x=x, w=b.w(layer.ffn_norm.weight), b=b.w(layer.ffn_norm.bias), out=h, rows=rows, dim=d,
                 eps=layer.ffn_norm.eps)
        b.project(layer.ffn_in, h, f, rows, d, cfg.dim_feedforward)
        b.p.gelu(x=f, out=f, rows=rows, cols=cfg.dim_feedforward)
        b.project(layer.ffn_out, f, o, rows, cfg.dim_feedforward, d)
        b.p.scale_add(x=x, y=o, out=x, rows=rows, cols=d, scale=b.w(layer.ffn_scale))


def emit_encoder(b: Builder, mimi: Mimi, pcm: int) -> tuple[int, int]:
    """pcm [B, frame] float32 -> the user's codes (semantic [B, n_sem], acoustic [B, rest])."""
    dt, enc = mimi.dtype, mimi.encoder
    x, T = _conv(b, enc.input_conv, pcm, mimi.cfg.frame_size, False, dt)
    for units, down in zip(enc.residuals, enc.downsamples):
        for unit in units:
            x = _residual_unit(b, unit, x, T, dt)
        x, T = _conv(b, down, x, T, True, dt)
    x, T = _conv(b, enc.output_conv, x, T, True, dt)
    _mimi_transformer(b, mimi.encoder_transformer, x, T, dt)
    x, T = _conv(b, mimi.downsample, x, T, False, dt)
    codes = []
    for rvq in (mimi.quantizer.semantic, mimi.quantizer.acoustic):
        books = rvq.tables()
        n_q, bins, D = books.shape
        xi = b.buf((b.B, D), mx.float32)
        b.project(rvq.input_proj, x, xi, b.B, rvq.input_proj.weight.shape[1], D)
        c = b.buf((b.B, n_q), mx.int32)
        b.p.rvq_encode(x=xi, books=b.w(books), codes=c, n=b.B, n_q=n_q, bins=bins, D=D)
        codes.append(c)
    return codes[0], codes[1]


def emit_decoder(b: Builder, mimi: Mimi, sem: int, ac: int, valid: int, pcm_out: int) -> None:
    """The model's codes (semantic [B, n_sem], acoustic [B, rest]) -> pcm_out [B, frame],
    muted where not valid."""
    dt, B = mimi.dtype, b.B
    d = mimi.cfg.seanet.dimension
    x = b.buf((B, d), dt)
    for i, (rvq, codes) in enumerate(((mimi.quantizer.semantic, sem), (mimi.quantizer.acoustic, ac))):
        books = rvq.tables()
        n_q, bins, D = books.shape
        z = b.buf((B, D), mx.float32)
        b.p.rvq_decode(codes=codes, books=b.w(books), out=z, n=B, n_q=n_q, bins=bins, D=D)
        b.project(rvq.output_proj, z, x, B, D, d, residual=i > 0)
    x, T = _convtr(b, mimi.upsample, x, 1, False, dt)
    _mimi_transformer(b, mimi.decoder_transformer, x, T, dt)
    dec = mimi.decoder
    x, T = _conv(b, dec.input_conv, x, T, False, dt)
    for up, units in zip(dec.upsamples, dec.residuals):
        x, T = _convtr(b, up, x, T, True, dt)
        for unit in units:
            x = _residual_unit(b, unit, x, T, dt)
    x, T = _conv(b, dec.output_conv, x, T, True, dt)
    b.p.mute(x=x, valid=valid, out=pcm_out, rows=B, cols=T)


# ---------------------------------------------------------------------------------- LM


def _cast(a: mx.array, dtype) -> mx.array:
    return a if a.dtype == dtype else a.astype(dtype)


def _proj(layer: nn.Module):
    p = ops.projection(layer)
    if p is None:
        raise Unsupported(f"{type(layer).__name__} (bias-free Linear or affine group-64 QuantizedLinear only)")
    return p


def _table(layer: nn.Module, dtype) -> mx.array:
    """A dense embedding table (a quantized one is dequantized once, here)."""
    if isinstance(layer, nn.QuantizedEmbedding):
        t = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
        return t.astype(dtype)
    return layer.weight if layer.weight.dtype == dtype else layer.weight.astype(dtype)


def _decoder_layer(b: Builder, layer, step: int, x: int, pos: int, kc: int, vc: int, W: int, rope: float,
                   dtype) -> None:
    """One layer of the temporal transformer or the depformer, x [B, C] in place."""
    B = b.B
    C = layer.norm1.alpha.size
    H = layer.self_attn.num_heads
    D, es = C // H, dtype.size
    ffn = layer.gating[step] if isinstance(layer.gating, list) else layer.gating
    out = ffn.linear_out
    hidden = out.weight.shape[1] * 32 // out.bits if isinstance(out, nn.QuantizedLinear) else out.weight.shape[1]
    qkv, attn = b.shared("qkv", (B, 3 * C), dtype), b.shared("attn", (B, C), dtype)
    h = b.shared("hidden", (B, hidden), dtype)
    b.project(layer.self_attn.in_projs[step], x, qkv, B, C, 3 * C, norm=layer.norm1)
    b.p.attention(q=qkv, k=b.view(qkv, C * es, dtype), v=b.view(qkv, 2 * C * es, dtype), k_cache=kc, v_cache=vc,
                  pos=pos, out=attn, B=B, H=H, T=1, D=D, W=W, new_strides=[3 * C, D, 3 * C],
                  rope_max_period=rope)
    b.project(layer.self_attn.out_projs[step], attn, x, B, C, C, residual=True)
    b.project(ffn.linear_in, x, h, B, C, hidden, norm=layer.norm2, gate=True)
    b.project(out, h, x, B, hidden, C, residual=True)


def emit_lm(b: Builder, lm: LM, sampling: SamplingConfig, user_sem: int, user_ac: int, n_sem: int,
            n_ac: int) -> tuple[LMHandles, int, int, int, int, int]:
    """The LM step of B sessions from the user's codes; returns (state handles,
    tokens out [B, 1 + dep_q], decoder codes sem, ac, valid [B], seeds)."""
    cfg, dt, B = lm.cfg, lm.dtype, b.B
    C, Q, R = cfg.dim, cfg.dep_q, cfg.max_delay + 2
    offsets = b.buf((B,), mx.int32, reset=RESET_LM)
    tokens = b.buf((B, 1 + cfg.n_q, R), mx.int32, reset=RESET_LM, pattern=UNGENERATED)
    forced = b.buf((B, 1 + Q, R), mx.int32, reset=RESET_LM, pattern=NOT_FORCED)
    seeds = b.buf((B,), mx.uint32, reset=RESET_SEED, control_col=1)
    delays = b.const(np.array(cfg.delays, np.int32))
    cur = b.buf((1 + cfg.n_q, B), mx.int32)
    now = b.buf((1 + Q, B), mx.int32)
    b.p.frame_in(tokens=tokens, forced=forced, offsets=offsets, delays=delays, sem=user_sem, ac=user_ac, cur=cur,
                 now=now, B=B, n_q=cfg.n_q, dep_q=Q, n_sem=n_sem, n_ac=n_ac, R=R, max_delay=cfg.max_delay,
                 text_initial=cfg.text_initial_token, audio_initial=cfg.audio_initial_token, card=cfg.card)

    # The input embedding: the sum of the 1 + n_q streams' rows, rounded after each add.
    zero = b.buf((B, C), dt)
    x = b.buf((B, C), dt)
    for s, table in enumerate([lm.text_emb, *lm.emb]):
        t = _table(table, dt)
        b.p.embed_add(pre=zero if s == 0 else x, table=b.w(t), tokens=b.view(cur, 4 * s * B, mx.int32), out=x,
                      B=B, D=C, rows=t.shape[0])

    # Temporal transformer.
    keys, values = [], []
    for layer in lm.transformer.layers:
        keys.append(b.buf((B, cfg.num_heads, cfg.context, cfg.head_dim), dt))
        values.append(b.buf((B, cfg.num_heads, cfg.context, cfg.head_dim), dt))
        _decoder_layer(b, layer, 0, x, offsets, keys[-1], values[-1], cfg.context, cfg.max_period, dt)
    h = b.buf((B, C), dt)
    b.p.norm(x=x, w=b.w(lm.out_norm.alpha), out=h, rows=B, dim=C, eps=lm.out_norm.eps)

    # Text token.
    gen = b.buf((1 + Q, B), mx.int32)
    greedy = sampling.greedy
    text_logits = b.buf((B, cfg.text_card), dt)
    b.project(lm.text_linear, h, text_logits, B, C, cfg.text_card)
    noise = -1
    if not (greedy or sampling.temp_text <= 0):
        noise = b.buf((B, cfg.text_card), mx.float32)
        b.p.gumbel(seeds=seeds, offsets=offsets, out=noise, B=B, V=cfg.text_card, streams=1, stream0=0)
    b.p.sample(logits=text_logits, out=gen, rows=B, V=cfg.text_card, temp=sampling.temp_text,
               top_k=sampling.topk_text, greedy=greedy, noise=noise, forced=now)

    # Depformer: the dep_q codebooks, one after the other.
    d = cfg.depformer
    Dd = d.dim
    rope = d.max_period if d.pos_emb == "rope" else 0.0
    dep_pos = b.const(np.repeat(np.arange(Q, dtype=np.int32)[:, None], B, axis=1))
    dk = [b.buf((B, d.num_heads, Q, d.head_dim), dt) for _ in lm.depformer.layers]
    dv = [b.buf((B, d.num_heads, Q, d.head_dim), dt) for _ in lm.depformer.layers]
    pre = b.buf((B, Dd), dt)
    dx = b.buf((B, Dd), dt)
    logits = b.buf((B, cfg.card), dt)
    noise = -1
    if not (greedy or sampling.temp_audio <= 0):
        noise = b.buf((Q, B, cfg.card), mx.float32)
        b.p.gumbel(seeds=seeds, offsets=offsets, out=noise, B=B, V=cfg.card, streams=Q, stream0=1)
    tables = [lm.depformer_text_emb, *lm.depformer_emb]
    for k in range(Q):
        step = k if d.weights_per_step else 0
        b.project(lm.depformer_in[k if d.multi_linear else 0], h, pre, B, C, Dd)
        t = _table(tables[k], dt)
        b.p.embed_add(pre=pre, table=b.w(t), tokens=b.view(gen, 4 * k * B, mx.int32), out=dx, B=B, D=Dd,
                      rows=t.shape[0])
        pos = b.view(dep_pos, 4 * k * B, mx.int32)
        for i, layer in enumerate(lm.depformer.layers):
            _decoder_layer(b, layer, step, dx, pos, dk[i], dv[i], Q, rope, dt)
        b.project(lm.linears[k], dx, logits, B, Dd, cfg.card)
        b.p.sample(logits=logits, out=b.view(gen, 4 * (1 + k) * B, mx.int32), rows=B, V=cfg.card,
                   temp=sampling.temp_audio, top_k=sampling.topk_audio, greedy=greedy,
                   noise=-1 if noise < 0 else b.view(noise, 4 * k * B * cfg.card, mx.float32),
                   forced=b.view(now, 4 * (1 + k) * B, mx.int32))

    out = b.buf((B, 1 + Q), mx.int32)
    dec_sem = b.buf((B, n_sem), mx.int32)
    dec_ac = b.buf((B, Q - n_sem), mx.int32)
    valid = b.buf((B,), mx.int32)
    b.p.frame_out(tokens=tokens, offsets=offsets, delays=delays, gen=gen, out=out, sem=dec_sem, ac=dec_ac,
                  valid=valid, B=B, n_q=cfg.n_q, dep_q=Q, n_sem=n_sem, R=R, max_delay=cfg.max_delay,
                  card=cfg.card)
    return LMHandles(keys, values, offsets, tokens, forced), out, dec_sem, dec_ac, valid, seeds


# ------------------------------------------------------------------------------ runner


class TickRunner:
    """A built program and what the engine needs to drive it."""

    def __init__(self, lm: LM, mimi: Mimi, slots: int, sampling: SamplingConfig, gpu: bool,
                 gemm_forms: bool | None = None):
        why = supported(lm, mimi, gpu)
        if why is not None:
            raise Unsupported(why)
        if lm.cfg.card != mimi.cfg.quantizer.bins or lm.cfg.dep_q != mimi.cfg.num_codebooks:
            raise Unsupported("the LM's codebooks do not match Mimi's")
        b = Builder(slots, gpu, gemm_forms)
        F = mimi.cfg.frame_size
        self.lm_cfg, self.gpu = lm.cfg, gpu
        self.slots, self.frame_size = slots, F
        pcm_in = b.buf((slots, F), mx.float32)
        control = b.buf((slots, CONTROL_COLS), mx.int32)
        pcm_out = b.buf((slots, F), mx.float32)
        G = 1 + lm.cfg.dep_q
        n_sem = mimi.cfg.quantizer.n_q_semantic
        n_ac = mimi.cfg.num_codebooks - n_sem
        # The tick's operands come first: set_io lets reset regions check their rows.
        tokens_out = b.buf((slots, G), mx.int32)
        b.p.set_io(pcm_in=pcm_in, control=control, pcm_out=pcm_out, tokens=tokens_out, B=slots, F=F,
                   C=CONTROL_COLS, G=G)
        sem, ac = emit_encoder(b, mimi, pcm_in)
        self.lm, out, dec_sem, dec_ac, valid, _ = emit_lm(b, lm, sampling, sem, ac, n_sem, n_ac)
        b.p.copy(dst=tokens_out, src=out, bytes=slots * G * 4)
        emit_decoder(b, mimi, dec_sem, dec_ac, valid, pcm_out)
        b.finish()
        self.program = b.p
        self._builder = b  # holds the weights' source arrays

    def __call__(self, pcm: mx.array, control: mx.array) -> tuple[mx.array, mx.array]:
        from . import _ext

        out = _ext.tick(self.program, pcm, control, stream=mx.gpu if self.gpu else mx.cpu)
        return out[0], out[1]

    def load_lm_row(self, slot: int, state: LMState) -> None:
        """Copies a batch-of-one LM state (a prompted session) into slot's rows."""
        h = self.lm
        pairs = [*zip(h.keys, state.kv.keys), *zip(h.values, state.kv.values),
                 (h.offsets, state.offsets), (h.tokens, state.tokens), (h.forced, state.forced)]
        rows = [mx.contiguous(a[0].astype(mx.int32) if a.dtype != mx.int32 and handle in
                              (h.offsets, h.tokens, h.forced) else a[0]) for handle, a in pairs]
        mx.eval(rows)
        for (handle, _), row in zip(pairs, rows):
            self.program.write(handle, slot * row.nbytes, row)

    def set_offsets(self, offsets: np.ndarray) -> None:
        """Puts every session at the given frame (benchmarks: a full attention window)."""
        a = mx.array(np.asarray(offsets, np.int32).reshape(self.slots))
        mx.eval(a)
        self.program.write(self.lm.offsets, 0, a)

    def read_lm(self) -> dict[str, np.ndarray]:
        """The LM's offsets, token rings and forced rings (tests)."""
        cfg, B, R = self.lm_cfg, self.slots, self.lm_cfg.max_delay + 2

        def read(h, shape):
            n = math.prod(shape) * 4
            return np.array(self.program.read(h, 0, n)).view(np.int32).reshape(shape)

        return {"offsets": read(self.lm.offsets, (B,)), "tokens": read(self.lm.tokens, (B, 1 + cfg.n_q, R)),
                "forced": read(self.lm.forced, (B, 1 + cfg.dep_q, R))}


class CodecRunner:
    """Mimi alone as a program: each tick encodes B frames and decodes the codes it just
    made (benchmarks of the codec's fixed cost; tests against Mimi's own streaming)."""

    def __init__(self, mimi: Mimi, slots: int, gpu: bool, gemm_forms: bool | None = None):
        b = Builder(slots, gpu, gemm_forms)
        F = mimi.cfg.frame_size
        self.slots, self.gpu = slots, gpu
        pcm_in = b.buf((slots, F), mx.float32)
        control = b.buf((slots, 1), mx.int32)
        pcm_out = b.buf((slots, F), mx.float32)
        n_sem = mimi.cfg.quantizer.n_q_semantic
        codes = b.buf((slots, n_sem), mx.int32)
        b.p.set_io(pcm_in=pcm_in, control=control, pcm_out=pcm_out, tokens=codes, B=slots, F=F, C=1, G=n_sem)
        sem, ac = emit_encoder(b, mimi, pcm_in)
        b.p.copy(dst=codes, src=sem, bytes=slots * n_sem * 4)
        emit_decoder(b, mimi, sem, ac, b.const(np.ones(slots, np.int32)), pcm_out)
        b.finish()
        self.program, self._builder = b.p, b

    def __call__(self, pcm: mx.array, reset: mx.array) -> tuple[mx.array, mx.array]:
        """pcm [B, frame]; reset [B, 1] int32 (RESET_CODEC restarts a session) ->
        (the decoded pcm, the semantic codes)."""
        from . import _ext

        out = _ext.tick(self.program, pcm, reset, stream=mx.gpu if self.gpu else mx.cpu)
        return out[0], out[1]
