"""Mimi as tick-program ops: the SEANet convs with their streaming state, the codec's
transformer, the split RVQ; encode (pcm -> the user's codes) and decode (the model's
codes -> pcm), in the order and rounding of models/mimi.py."""

from __future__ import annotations

import mlx.core as mx

from ..models.mimi import Mimi
from ..models.mimi_layers import CausalConv1d, CausalConvTranspose1d
from . import builder
from .builder import RESET_CODEC, Builder

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
    gemm = b.gemm_forms and B * (T // stride) * C_out * K * C_in > builder.CONV_GEMM_MIN_MACS
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
    if b.gemm_forms and conv.groups == 1 and B * T * K * C_out * C_in > builder.CONV_GEMM_MIN_MACS:
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
