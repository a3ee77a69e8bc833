"""The transformer layer shared by the temporal transformer and the depformer.

Parameter names mirror the official module tree (`self_attn.in_projs.{step}`,
`gating.linear_in`, `norm1.alpha`, ...) so a checkpoint maps onto them 1:1 after
the stacked `in_proj_weight` is split per step (see checkpoint.py).

A layer with `steps > 1` has one set of projection and FFN weights per step:
the depformer runs codebook step k with weights k ("weights per step").
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..cache import RingKVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, f32: bool = True):
        super().__init__()
        # Kept as [1, 1, dim] to match the official parameter's shape.
        self.alpha = mx.ones((1, 1, dim))
        self.eps = eps
        self.f32 = f32

    def __call__(self, x: mx.array) -> mx.array:
        dtype = mx.float32 if self.f32 else x.dtype
        y = mx.fast.rms_norm(x.astype(dtype), self.alpha.reshape(-1).astype(dtype), self.eps)
        return y.astype(x.dtype)


class GatedFFN(nn.Module):
    """SiLU-gated feed-forward: linear_in gives [gate | value] halves."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        gate, value = mx.split(self.linear_in(x), 2, axis=-1)
        return self.linear_out(nn.silu(gate) * value)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, steps: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_projs = [nn.Linear(dim, 3 * dim, bias=False) for _ in range(steps)]
        self.out_projs = [nn.Linear(dim, dim, bias=False) for _ in range(steps)]

    def __call__(self, x: mx.array, cache: RingKVCache, layer: int, pos: mx.array,
                 step: int, rope_max_period: float | None) -> mx.array:
        B, T, C = x.shape
        qkv = self.in_projs[step](x).reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        out = cache.attend(layer, q, k, v, pos, rope_max_period)
        return self.out_projs[step](out.transpose(0, 2, 1, 3).reshape(B, T, C))


class Layer(nn.Module):
    def __init__(self, dim: int, num_heads: int, ffn_hidden: int, norm_eps: float,
                 norm_f32: bool, steps: int = 1):
        super().__init__()
        self.norm1 = RMSNorm(dim, norm_eps, norm_f32)
        self.self_attn = Attention(dim, num_heads, steps)
        self.norm2 = RMSNorm(dim, norm_eps, norm_f32)
        if steps == 1:
            self.gating = GatedFFN(dim, ffn_hidden)
        else:
            self.gating = [GatedFFN(dim, ffn_hidden) for _ in range(steps)]

    def __call__(self, x: mx.array, cache: RingKVCache, layer: int, pos: mx.array,
                 step: int = 0, rope_max_period: float | None = None) -> mx.array:
        x = x + self.self_attn(self.norm1(x), cache, layer, pos, step, rope_max_period)
        ffn = self.gating[step] if isinstance(self.gating, list) else self.gating
        return x + ffn(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = [Layer(**layer_kwargs) for _ in range(num_layers)]

    def __call__(self, x: mx.array, cache: RingKVCache, pos: mx.array, step: int = 0,
                 rope_max_period: float | None = None) -> mx.array:
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, pos, step, rope_max_period)
        return x
