"""Streaming building blocks of the Mimi codec: causal convolutions, SEANet, and the
small windowed transformer, each with its per-session cache as an explicit object.

Layout is channels-last throughout ([B, T, C]), MLX's native conv layout; the checkpoint
loader transposes PyTorch's [C_out, C_in, K] weights once at load time.

Every layer computes a whole clip exactly as it computes a stream: a clip is one long
step from a fresh cache. That is what makes `Mimi.encode` equal to streaming frame by
frame (up to float summation order), and it matches moshi, whose non-streaming path
also runs the causal convolutions from a zero (or replicated) left context.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..reference import rope


def _keep_where(mask: mx.array, fresh: mx.array, old: mx.array) -> mx.array:
    """Per-session select: `fresh` where mask[b] is set, else `old` (batch is axis 0)."""
    shape = (mask.shape[0],) + (1,) * (old.ndim - 1)
    return mx.where(mask.reshape(shape), fresh, old)


# ---------------------------------------------------------------------------- caches


class ConvCache:
    """Left context of a causal conv: the last (effective kernel - stride) input samples."""

    def __init__(self, batch: int, length: int, channels: int, dtype: mx.Dtype, replicate: bool):
        self.previous = mx.zeros((batch, length, channels), dtype=dtype)
        # 'replicate' padding (the 12.5 Hz downsampler) fills the context with the first
        # sample a session sees, so each session remembers whether it has seen one yet.
        self.replicate = replicate
        self.first = mx.ones((batch,), dtype=mx.bool_)

    def reset(self, mask: mx.array) -> None:
        self.previous = _keep_where(mask, mx.zeros_like(self.previous), self.previous)
        self.first = mx.where(mask, True, self.first)


class ConvTrCache:
    """Overlap of a transposed conv: the (kernel - stride) output samples that the next
    input frame still adds to, stored without bias so the bias is counted once."""

    def __init__(self, batch: int, length: int, channels: int, dtype: mx.Dtype):
        self.partial = mx.zeros((batch, length, channels), dtype=dtype)

    def reset(self, mask: mx.array) -> None:
        self.partial = _keep_where(mask, mx.zeros_like(self.partial), self.partial)


class WindowKVCache:
    """Keys/values of the last `context` steps of every session, concat-and-trim.

    `positions[b, i]` is the absolute time of entry i for session b, -1 when empty, so
    a reset session masks out its stale entries without moving the others. The window
    always holds `context` entries (empty ones at -1 from the start), so every step has
    the same shapes and the compiled layer step (_layer_step) is traced once.
    """

    def __init__(self, batch: int, heads: int, head_dim: int, context: int, dtype: mx.Dtype):
        self.context = context
        self.keys = mx.zeros((batch, heads, context, head_dim), dtype=dtype)
        self.values = mx.zeros((batch, heads, context, head_dim), dtype=dtype)
        self.positions = mx.full((batch, context), -1, dtype=mx.int32)

    def reset(self, mask: mx.array) -> None:
        self.positions = _keep_where(mask, mx.full(self.positions.shape, -1, mx.int32), self.positions)


class MimiTransformerCache:
    """Per-session time offset (for RoPE and the causal window) plus one KV cache per layer."""

    def __init__(self, batch: int, layers: list[WindowKVCache]):
        self.offset = mx.zeros((batch,), dtype=mx.int32)
        self.layers = layers

    def reset(self, mask: mx.array) -> None:
        self.offset = mx.where(mask, 0, self.offset)
        for layer in self.layers:
            layer.reset(mask)


# ------------------------------------------------------------------------ convolutions


class CausalConv1d(nn.Module):
    """Conv1d padded on the left only, by the kernel's reach minus the stride, so every
    `stride` new input samples give exactly one new output sample."""

    def __init__(self, c_in, c_out, kernel, stride=1, dilation=1, bias=True, replicate=False):
        super().__init__()
        self.weight = mx.zeros((c_out, kernel, c_in))
        if bias:
            self.bias = mx.zeros((c_out,))
        self.stride, self.dilation, self.replicate = stride, dilation, replicate
        self.context = (kernel - 1) * dilation + 1 - stride

    def new_cache(self, batch: int, dtype: mx.Dtype) -> ConvCache:
        return ConvCache(batch, self.context, self.weight.shape[2], dtype, self.replicate)

    def __call__(self, x: mx.array, cache: ConvCache, elu: bool = False) -> mx.array:
        """`elu`: apply ELU to x first (SEANet's pre-activation), fused into the conv."""
        if x.shape[1] % self.stride:
            raise ValueError(f"conv input of {x.shape[1]} steps is not a multiple of stride {self.stride}")
        y, cache.previous = ops.conv1d_stream(
            x, cache.previous, self.weight, self.bias if "bias" in self else None,
            stride=self.stride, dilation=self.dilation, elu_input=elu,
            first=cache.first if self.replicate else None)
        if self.replicate:
            cache.first = mx.zeros_like(cache.first)
        return y


class CausalConvTranspose1d(nn.Module):
    """ConvTranspose1d whose last (kernel - stride) outputs are held back until the next
    frame has added its overlap; a clip's tail overlap is dropped, as in moshi."""

    def __init__(self, c_in, c_out, kernel, stride, bias=True, groups=1):
        super().__init__()
        self.weight = mx.zeros((c_out, kernel, c_in // groups))
        if bias:
            self.bias = mx.zeros((c_out,))
        self.stride, self.groups = stride, groups
        self.overlap = kernel - stride

    def new_cache(self, batch: int, dtype: mx.Dtype) -> ConvTrCache:
        return ConvTrCache(batch, self.overlap, self.weight.shape[0], dtype)

    def __call__(self, x: mx.array, cache: ConvTrCache, elu: bool = False) -> mx.array:
        y, cache.partial = ops.conv_transpose1d_stream(
            x, cache.partial, self.weight, self.bias if "bias" in self else None,
            stride=self.stride, groups=self.groups, elu_input=elu)
        return y


# ------------------------------------------------------------------------------ SEANet


class ResidualUnit(nn.Module):
    """ELU -> dilated conv to dim/compress -> ELU -> 1x1 conv back, plus identity skip."""

    def __init__(self, dim: int, hidden: int, kernel: int, dilation: int):
        super().__init__()
        self.conv1 = CausalConv1d(dim, hidden, kernel, dilation=dilation)
        self.conv2 = CausalConv1d(hidden, dim, 1)

    def convs(self) -> list:
        return [self.conv1, self.conv2]

    def __call__(self, x, caches):
        h = self.conv1(x, caches[0], elu=True)
        return x + self.conv2(h, caches[1], elu=True)


def _residual_units(cfg, dim: int) -> list:
    return [ResidualUnit(dim, dim // cfg.compress, cfg.residual_kernel_size, cfg.dilation_base**j)
            for j in range(cfg.n_residual_layers)]


class SeanetEncoder(nn.Module):
    """Waveform [B, T, 1] -> latent [B, T / hop, dimension], downsampling by ratios[::-1]."""

    def __init__(self, cfg):
        super().__init__()
        width = cfg.n_filters
        self.input_conv = CausalConv1d(cfg.channels, width, cfg.kernel_size)
        self.residuals, self.downsamples = [], []
        for ratio in reversed(cfg.ratios):
            self.residuals.append(_residual_units(cfg, width))
            self.downsamples.append(CausalConv1d(width, 2 * width, 2 * ratio, stride=ratio))
            width *= 2
        self.output_conv = CausalConv1d(width, cfg.dimension, cfg.last_kernel_size)

    def convs(self) -> list:
        """Every conv in execution order; the cache list follows this order."""
        out = [self.input_conv]
        for units, down in zip(self.residuals, self.downsamples):
            out += [c for unit in units for c in unit.convs()] + [down]
        return out + [self.output_conv]

    def __call__(self, x, caches):
        caches = iter(caches)
        x = self.input_conv(x, next(caches))
        for units, down in zip(self.residuals, self.downsamples):
            for unit in units:
                x = unit(x, [next(caches), next(caches)])
            x = down(x, next(caches), elu=True)
        return self.output_conv(x, next(caches), elu=True)


class SeanetDecoder(nn.Module):
    """Latent [B, T, dimension] -> waveform [B, T * hop, 1], upsampling by ratios."""

    def __init__(self, cfg):
        super().__init__()
        width = cfg.n_filters * 2 ** len(cfg.ratios)
        self.input_conv = CausalConv1d(cfg.dimension, width, cfg.kernel_size)
        self.upsamples, self.residuals = [], []
        for ratio in cfg.ratios:
            self.upsamples.append(CausalConvTranspose1d(width, width // 2, 2 * ratio, ratio))
            self.residuals.append(_residual_units(cfg, width // 2))
            width //= 2
        self.output_conv = CausalConv1d(width, cfg.channels, cfg.last_kernel_size)

    def convs(self) -> list:
        out = [self.input_conv]
        for up, units in zip(self.upsamples, self.residuals):
            out += [up] + [c for unit in units for c in unit.convs()]
        return out + [self.output_conv]

    def __call__(self, x, caches):
        caches = iter(caches)
        x = self.input_conv(x, next(caches))
        for up, units in zip(self.upsamples, self.residuals):
            x = up(x, next(caches), elu=True)
            for unit in units:
                x = unit(x, [next(caches), next(caches)])
        return self.output_conv(x, next(caches), elu=True)


# ------------------------------------------------------------------------- transformer


def _layer_step(x, positions, keys, values, key_pos, attn_norm_w, attn_norm_b, in_proj, out_proj,
                attn_scale, ffn_norm_w, ffn_norm_b, ffn_in, ffn_out, ffn_scale, *, heads: int,
                context: int, steps_per_frame: int, max_period: float, eps: float):
    """One pre-norm layer over a chunk x [B, T, d] with its window cache: returns
    (y, keys', values', key_pos'). A pure function of arrays, compiled once per shape
    (mx.compile fuses its elementwise work: RoPE, masks, norms, layer scales)."""
    b, t, d = x.shape
    h = mx.fast.layer_norm(x, attn_norm_w, attn_norm_b, eps)
    qkv = (h @ in_proj.T).reshape(b, t, 3, heads, d // heads).transpose(2, 0, 3, 1, 4)
    q = rope(qkv[0], positions, max_period)
    k = rope(qkv[1], positions, max_period)
    all_keys = mx.concatenate([keys, k], axis=2)
    all_values = mx.concatenate([values, qkv[2]], axis=2)
    all_pos = mx.concatenate([key_pos, positions], axis=1)
    # moshi streams a frame's steps into a ring of `context` slots before attending, so
    # the oldest keys are already gone for the frame's earlier queries: the window ends
    # at the frame's last step, not at the query. Same mask for any chunking.
    g = steps_per_frame
    frame_end = (positions // g + 1) * g - 1
    k_pos = all_pos[:, None, :]
    mask = (k_pos >= 0) & (k_pos <= positions[:, :, None]) & (frame_end[:, :, None] - k_pos < context)
    out = mx.fast.scaled_dot_product_attention(q, all_keys, all_values, scale=1.0 / math.sqrt(d // heads),
                                               mask=mask[:, None])
    x = x + attn_scale * (out.transpose(0, 2, 1, 3).reshape(b, t, d) @ out_proj.T)
    h = mx.fast.layer_norm(x, ffn_norm_w, ffn_norm_b, eps)
    x = x + ffn_scale * (nn.gelu(h @ ffn_in.T) @ ffn_out.T)
    # The newest query reaches back `context` steps: keep the last `context` entries.
    return x, all_keys[:, :, -context:], all_values[:, :, -context:], all_pos[:, -context:]


_compiled_layer_step = mx.compile(_layer_step)


class MimiTransformerLayer(nn.Module):
    """Pre-norm layer: x + s1 * attn(LN(x)), then x + s2 * W2 gelu(W1 LN(x))."""

    def __init__(self, cfg, steps_per_frame: int):
        super().__init__()
        d = cfg.d_model
        self.heads, self.context, self.max_period = cfg.num_heads, cfg.context, cfg.max_period
        self.steps_per_frame = steps_per_frame
        self.attn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.in_proj = nn.Linear(d, 3 * d, bias=False)
        self.out_proj = nn.Linear(d, d, bias=False)
        self.attn_scale = mx.full((d,), cfg.layer_scale)
        self.ffn_norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.ffn_in = nn.Linear(d, cfg.dim_feedforward, bias=False)
        self.ffn_out = nn.Linear(cfg.dim_feedforward, d, bias=False)
        self.ffn_scale = mx.full((d,), cfg.layer_scale)

    def __call__(self, x, positions, cache: WindowKVCache, compiled: bool = True):
        step = _compiled_layer_step if compiled else _layer_step
        y, cache.keys, cache.values, cache.positions = step(
            x, positions, cache.keys, cache.values, cache.positions, self.attn_norm.weight,
            self.attn_norm.bias, self.in_proj.weight, self.out_proj.weight, self.attn_scale,
            self.ffn_norm.weight, self.ffn_norm.bias, self.ffn_in.weight, self.ffn_out.weight,
            self.ffn_scale, heads=self.heads, context=self.context, steps_per_frame=self.steps_per_frame,
            max_period=self.max_period, eps=self.attn_norm.eps)
        return y


class MimiTransformer(nn.Module):
    """Mimi's causal transformer over [B, T, d_model] latents (LayerNorm, GELU, layer
    scales; not the LM's models/transformer.py) with a sliding window of `context`
    steps; a codec frame spans `steps_per_frame` steps (see the mask in attention)."""

    def __init__(self, cfg, steps_per_frame: int):
        super().__init__()
        self.cfg = cfg
        self.layers = [MimiTransformerLayer(cfg, steps_per_frame) for _ in range(cfg.num_layers)]

    def new_cache(self, batch: int, dtype: mx.Dtype) -> MimiTransformerCache:
        c = self.cfg
        return MimiTransformerCache(batch, [
            WindowKVCache(batch, c.num_heads, c.d_model // c.num_heads, c.context, dtype)
            for _ in self.layers])

    def __call__(self, x, cache: MimiTransformerCache):
        positions = cache.offset[:, None] + mx.arange(x.shape[1], dtype=mx.int32)
        for layer, kv in zip(self.layers, cache.layers):
            x = layer(x, positions, kv)
        cache.offset = cache.offset + x.shape[1]
        return x
