"""Pure-MLX references of the fused primitives, under the same names as in ops.py.

They define what each primitive computes and are the `--reference` path of the
engine. Clarity first: no in-place tricks, float32 arithmetic throughout.
"""

from __future__ import annotations

import math

import mlx.core as mx


def rope(x: mx.array, start: mx.array, max_period: float) -> mx.array:
    """Kyutai's interleaved RoPE on x [B, H, T, D] at positions start[b] + t.

    Angles and products in float32, rounded back to x's dtype, as moshi does.
    """
    B, H, T, D = x.shape
    freqs = mx.exp(mx.arange(D // 2, dtype=mx.float32) * (-math.log(max_period) * 2 / D))
    t = start.astype(mx.float32)[:, None] + mx.arange(T, dtype=mx.float32)[None]
    angle = t[:, None, :, None] * freqs
    cos, sin = mx.cos(angle), mx.sin(angle)
    pairs = x.astype(mx.float32).reshape(B, H, T, D // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = mx.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(B, H, T, D).astype(x.dtype)


def ring_attention(q, k, v, k_cache, v_cache, pos, *, rope_max_period: float | None = 10000.0,
                   scale: float | None = None):
    """One streaming attention step over a ring KV cache (see csrc/ring_attention.h).

    q, k, v [B, H, T, D]; caches [B, H, W, D] with position p in slot p % W;
    pos [B] int: position of each session's first new token. Each new position
    p attends to [max(0, p - W + 1), p]. Returns (out, k_cache', v_cache').
    """
    B, H, T, D = q.shape
    W = k_cache.shape[2]
    pos = mx.array(pos).astype(mx.int32)
    if rope_max_period is not None:
        q, k = rope(q, pos, rope_max_period), rope(k, pos, rope_max_period)
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    # The position each slot holds before the write: the latest p < pos with p % W == slot
    # (negative when never written).
    slots = mx.arange(W)
    old = pos[:, None] - 1 - ((pos[:, None] - 1 - slots[None]) % W)
    new = pos[:, None] + mx.arange(T)[None]
    key_pos = mx.concatenate([old, new], axis=1)  # [B, W + T]
    keys = mx.concatenate([k_cache, k], axis=2).astype(mx.float32)
    values = mx.concatenate([v_cache, v], axis=2).astype(mx.float32)
    delta = new[:, :, None] - key_pos[:, None, :]
    visible = (key_pos[:, None, :] >= 0) & (delta >= 0) & (delta < W)
    scores = (q.astype(mx.float32) @ keys.transpose(0, 1, 3, 2)) * scale
    scores = mx.where(visible[:, None], scores, -mx.inf)
    out = (mx.softmax(scores, axis=-1) @ values).astype(q.dtype)

    # Slot s takes the last new position that maps to it (only the last W survive).
    hit = ((new[:, :, None] % W) == slots[None, None, :]) & (new[:, :, None] >= (pos + T - W)[:, None, None])
    written = hit.any(axis=1)  # [B, W]
    src = mx.argmax(hit.astype(mx.int32), axis=1)  # [B, W]
    k_new = mx.take_along_axis(k, src[:, None, :, None], axis=2)
    v_new = mx.take_along_axis(v, src[:, None, :, None], axis=2)
    mask = written[:, None, :, None]
    return out, mx.where(mask, k_new, k_cache), mx.where(mask, v_new, v_cache)
