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

from .. import ops, reference
from ..reference import LayerStack, LayerWeights
from .cache import RingKVCache


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


def linear(layer: nn.Module, x: mx.array, *, norm: RMSNorm | None = None, gate: bool = False,
           residual: mx.array | None = None) -> mx.array:
    """residual + [silu-gate of] layer(norm(x)) as one ops.matvec where it applies.

    layer is a bias-free nn.Linear or an affine nn.QuantizedLinear of group 64 (what
    `convert` writes); anything else runs unfused. The norm is folded in when it is
    computed in float32 (the 7B's rms_norm_f32), as reference.matvec spells it.
    """
    alpha, eps = None, 1e-8
    if norm is not None:
        if norm.f32:
            alpha, eps = norm.alpha.reshape(-1), norm.eps
        else:
            x = norm(x)
    p = ops.projection(layer)
    if p is None:  # unfused
        if alpha is not None:
            x = norm(x)
        return reference.gate_residual(layer(x), gate=gate, residual=residual)
    return ops.matvec(x, p.w, p.scales, p.biases, bits=p.bits, alpha=alpha, eps=eps, gate=gate,
                      residual=residual)


class GatedFFN(nn.Module):
    """SiLU-gated feed-forward: linear_in gives [gate | value] halves."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.linear_out = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array, norm: RMSNorm | None = None) -> mx.array:
        """x + linear_out(silu-gated linear_in(norm(x)))."""
        h = linear(self.linear_in, x, norm=norm, gate=True)
        return linear(self.linear_out, h, residual=x)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, steps: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_projs = [nn.Linear(dim, 3 * dim, bias=False) for _ in range(steps)]
        self.out_projs = [nn.Linear(dim, dim, bias=False) for _ in range(steps)]

    def __call__(self, x: mx.array, cache: RingKVCache, layer: int, pos: mx.array,
                 step: int, rope_max_period: float | None, norm: RMSNorm | None = None) -> mx.array:
        """x + attention(norm(x)) over the layer's ring cache."""
        B, T, C = x.shape
        qkv = linear(self.in_projs[step], x, norm=norm)
        qkv = qkv.reshape(B, T, 3, self.num_heads, C // self.num_heads)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        out = cache.attend(layer, q, k, v, pos, rope_max_period)
        return linear(self.out_projs[step], out.transpose(0, 2, 1, 3).reshape(B, T, C), residual=x)


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
        x = self.self_attn(x, cache, layer, pos, step, rope_max_period, norm=self.norm1)
        ffn = self.gating[step] if isinstance(self.gating, list) else self.gating
        return ffn(x, norm=self.norm2)


class Transformer(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs):
        super().__init__()
        self.layers = [Layer(**layer_kwargs) for _ in range(num_layers)]
        self.num_heads = layer_kwargs["num_heads"]

    def stack_weights(self, step: int = 0) -> LayerStack | None:
        """The layers' weights of codebook step `step` for ops.decoder_layers, or None
        where a layer has no such form (a bias or another quantization
        (ops.projection), a norm not in float32, norms of different eps)."""
        layers, eps = [], set()
        for layer in self.layers:
            if not (layer.norm1.f32 and layer.norm2.f32):
                return None
            ffn = layer.gating[step] if isinstance(layer.gating, list) else layer.gating
            attn = layer.self_attn
            projs = [ops.projection(m) for m in (attn.in_projs[step], attn.out_projs[step], ffn.linear_in,
                                                 ffn.linear_out)]
            if any(p is None for p in projs):
                return None
            eps.update((layer.norm1.eps, layer.norm2.eps))
            in_proj, out_proj, linear_in, linear_out = projs
            layers.append(LayerWeights(norm1=layer.norm1.alpha, in_proj=in_proj, out_proj=out_proj,
                                       norm2=layer.norm2.alpha, linear_in=linear_in, linear_out=linear_out))
        return LayerStack(tuple(layers), eps.pop()) if len(eps) == 1 else None

    def __call__(self, x: mx.array, cache: RingKVCache, pos: mx.array, step: int = 0,
                 rope_max_period: float | None = None, stack: LayerStack | None = None) -> mx.array:
        """stack: stack_weights(step), kept by the caller; where ops.decoder_layers_fusable
        says so, one decode step runs the whole stack as that one primitive."""
        if ops.decoder_layers_fusable(x, stack, self.num_heads, cache.keys[0]):
            y, cache.keys, cache.values = ops.decoder_layers(
                x[:, 0], pos, stack, cache.keys, cache.values, heads=self.num_heads,
                rope_max_period=rope_max_period)
            return y[:, None]
        for i, layer in enumerate(self.layers):
            x = layer(x, cache, i, pos, step, rope_max_period)
        return x
