"""The LM step as tick-program ops: token rings and embeddings, the temporal
transformer, text sampling, the depformer's codebooks, the delayed output frame; in
the order and rounding of models/lm.py's step with the fused ops."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..models.lm import LM, NOT_FORCED, UNGENERATED
from ..sampling import SamplingConfig
from .builder import RESET_LM, RESET_SEED, Builder


@dataclass
class LMHandles:
    """The program's LM state, for loading a prompted session's rows."""

    keys: list[int]  # per layer; int8 codes where kv_bits is 8
    values: list[int]
    offsets: int
    tokens: int
    forced: int
    key_scales: list[int]  # kv_bits 8: per layer, float32 [B, H, W]; else empty
    value_scales: list[int]
    kv_bits: int | None = None


@dataclass
class LMOutputs:
    """What the LM step leaves for the rest of the tick (handles of int32 regions)."""

    tokens: int  # [B, 1 + dep_q]: text, then the model's codes (-2 while not valid)
    codes_sem: int  # [B, n_sem]: the decoder's codes (0 while not valid)
    codes_ac: int  # [B, dep_q - n_sem]
    valid: int  # [B]


def _table(layer: nn.Module, dtype) -> mx.array:
    """A dense embedding table (a quantized one is dequantized once, here)."""
    if isinstance(layer, nn.QuantizedEmbedding):
        t = mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=layer.group_size, bits=layer.bits)
        return t.astype(dtype)
    return layer.weight if layer.weight.dtype == dtype else layer.weight.astype(dtype)


def _decoder_layer(b: Builder, layer, step: int, x: int, pos: int, kc: int, vc: int, W: int, rope: float,
                   dtype, scales: tuple[int, int] = (-1, -1)) -> None:
    """One layer of the temporal transformer or the depformer, x [B, C] in place;
    scales: an 8-bit ring's (keys, values) scale regions (kc, vc then hold int8 codes)."""
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
                  rope_max_period=rope, k_scales=scales[0], v_scales=scales[1])
    b.project(layer.self_attn.out_projs[step], attn, x, B, C, C, residual=True)
    b.project(ffn.linear_in, x, h, B, C, hidden, norm=layer.norm2, gate=True)
    b.project(out, h, x, B, hidden, C, residual=True)


def emit_lm(b: Builder, lm: LM, sampling: SamplingConfig, user_sem: int, user_ac: int, n_sem: int,
            n_ac: int, kv_bits: int | None = None) -> tuple[LMHandles, LMOutputs]:
    """The LM step of B sessions from the user's codes (semantic [B, n_sem], acoustic
    [B, n_ac]). kv_bits 8: the temporal transformer's rings in 8 bits (models/cache.py)."""
    cfg, dt, B = lm.cfg, lm.dtype, b.B
    C, Q, R = cfg.dim, cfg.dep_q, cfg.max_delay + 2
    b.mark("lm input")
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
    b.mark("temporal")
    keys, values, key_scales, value_scales = [], [], [], []
    ring = (B, cfg.num_heads, cfg.context, cfg.head_dim)
    for layer in lm.transformer.layers:
        keys.append(b.buf(ring, mx.int8 if kv_bits == 8 else dt))
        values.append(b.buf(ring, mx.int8 if kv_bits == 8 else dt))
        scales = (-1, -1)
        if kv_bits == 8:
            key_scales.append(b.buf(ring[:3], mx.float32))
            value_scales.append(b.buf(ring[:3], mx.float32))
            scales = (key_scales[-1], value_scales[-1])
        _decoder_layer(b, layer, 0, x, offsets, keys[-1], values[-1], cfg.context, cfg.max_period, dt, scales)
    h = b.buf((B, C), dt)
    b.p.norm(x=x, w=b.w(lm.out_norm.alpha), out=h, rows=B, dim=C, eps=lm.out_norm.eps)

    # Text token.
    b.mark("text")
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
    b.mark("depformer")
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

    b.mark("lm output")
    out = b.buf((B, 1 + Q), mx.int32)
    dec_sem = b.buf((B, n_sem), mx.int32)
    dec_ac = b.buf((B, Q - n_sem), mx.int32)
    valid = b.buf((B,), mx.int32)
    b.p.frame_out(tokens=tokens, offsets=offsets, delays=delays, gen=gen, out=out, sem=dec_sem, ac=dec_ac,
                  valid=valid, B=B, n_q=cfg.n_q, dep_q=Q, n_sem=n_sem, R=R, max_delay=cfg.max_delay,
                  card=cfg.card)
    handles = LMHandles(keys, values, offsets, tokens, forced, key_scales, value_scales, kv_bits)
    return handles, LMOutputs(out, dec_sem, dec_ac, valid)
