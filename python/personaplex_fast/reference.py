"""Pure-MLX references of the fused primitives, under the same names as in ops.py.

They define what each primitive computes and are the `--reference` path of the
engine. Clarity first: no in-place tricks, float32 arithmetic throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


# The weights of the fused stacks, by name. Frozen and compared by identity: ops
# keeps what it derives from one (its bit width, the extension's array lists) for
# as long as the object lives.


@dataclass(frozen=True, eq=False)
class Projection:
    """A bias-free linear layer as the fused primitives take it: w dense [N, K] in the
    activations' dtype (bits 0), or MLX's affine quantization with group 64 (bits 4 or
    8: w uint32 [N, K * bits / 32], scales and biases [N, K / 64])."""

    w: mx.array
    scales: mx.array | None = None
    biases: mx.array | None = None
    bits: int = 0


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One transformer layer of the LM: RMSNorm gains and the four projections."""

    norm1: mx.array  # alpha (C values, any shape) of the norm before attention
    in_proj: Projection  # [3C, C]: q, k, v
    out_proj: Projection  # [C, C]
    norm2: mx.array  # alpha of the norm before the FFN
    linear_in: Projection  # [2 * hidden, C]: SiLU gate, then value
    linear_out: Projection  # [C, hidden]

    def projections(self) -> tuple[Projection, ...]:
        return (self.in_proj, self.out_proj, self.linear_in, self.linear_out)


@dataclass(frozen=True, eq=False)
class LayerStack:
    """The layers decoder_layers runs in order, with the eps of all their norms."""

    layers: tuple[LayerWeights, ...]
    eps: float


@dataclass(frozen=True, eq=False)
class DepformerWeights:
    """What depformer_frame reads: per codebook step k, in_projs[k] (or one shared),
    tables[k] (the text embedding, then the audio embeddings), stacks[k] (or one
    shared) and heads[k]."""

    in_projs: tuple[Projection, ...]
    tables: tuple[mx.array, ...]
    stacks: tuple[LayerStack, ...]
    heads: tuple[Projection, ...]


def rope(x: mx.array, positions: mx.array, max_period: float) -> mx.array:
    """Kyutai's interleaved RoPE (pairs x[2i], x[2i + 1]) on x [B, H, T, D] at
    positions [B, T]: the LM's and Mimi's.

    Angles and products in float32, rounded back to x's dtype, as moshi does.
    """
    D = x.shape[-1]
    freqs = mx.exp(mx.arange(D // 2, dtype=mx.float32) * (-math.log(max_period) * 2 / D))
    angle = positions.astype(mx.float32)[:, None, :, None] * freqs
    cos, sin = mx.cos(angle), mx.sin(angle)
    pairs = x.astype(mx.float32).reshape(*x.shape[:-1], D // 2, 2)
    re, im = pairs[..., 0], pairs[..., 1]
    out = mx.stack([re * cos - im * sin, re * sin + im * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def positions(pos, batch: int) -> mx.array:
    """pos as int32 [batch]: an int (or 0-d array) is every session's position."""
    pos = (pos if isinstance(pos, mx.array) else mx.array(pos)).astype(mx.int32)
    return mx.broadcast_to(pos, (batch,)) if pos.ndim == 0 else pos


def quantize_rows(x):
    """x [..., D] -> (int8 codes [..., D], float32 scales [...]): per row scale = max |x| / 127
    and code = round(x / scale), ties to even (a zero row: scale 0, codes 0). The 8-bit
    ring's format (Engine(kv_bits=8)), as kernels/ring_attention.cuh's Int8Rows writes it."""
    xf = x.astype(mx.float32)
    scales = mx.max(mx.abs(xf), axis=-1) / 127.0
    s = scales[..., None]
    codes = mx.where(s > 0, mx.round(xf / mx.where(s > 0, s, 1.0)), 0.0)
    return mx.clip(codes, -127, 127).astype(mx.int8), scales


def dequantize_rows(codes, scales):
    """The rows of an 8-bit ring in float32: code * the row's scale."""
    return codes.astype(mx.float32) * scales[..., None]


def ring_attention(q, k, v, k_cache, v_cache, pos, *, rope_max_period: float | None = 10000.0,
                   scale: float | None = None):
    """One streaming attention step over a ring KV cache (see csrc/ring_attention.h).

    q, k, v [B, H, T, D]; caches [B, H, W, D] with position p in slot p % W, or 8-bit
    rings: (codes [B, H, W, D] int8, scales [B, H, W] float32) pairs (quantize_rows);
    pos [B] int: position of each session's first new token. Each new position
    p attends to [max(0, p - W + 1), p]: the new positions among themselves as
    computed, older ones as the ring holds them. Returns (out, k_cache', v_cache'),
    the caches in the form they came in.
    """
    B, H, T, D = q.shape
    quantized = isinstance(k_cache, tuple)
    W = k_cache[0].shape[2] if quantized else k_cache.shape[2]
    pos = positions(pos, B)
    if rope_max_period is not None:
        at = pos[:, None] + mx.arange(T, dtype=mx.int32)
        q, k = rope(q, at, rope_max_period), rope(k, at, rope_max_period)
    scale = 1.0 / math.sqrt(D) if scale is None else scale

    # The position each slot holds before the write: the latest p < pos with p % W == slot
    # (negative when never written).
    slots = mx.arange(W)
    old = pos[:, None] - 1 - ((pos[:, None] - 1 - slots[None]) % W)
    new = pos[:, None] + mx.arange(T)[None]
    key_pos = mx.concatenate([old, new], axis=1)  # [B, W + T]
    old_k, old_v = (dequantize_rows(*k_cache), dequantize_rows(*v_cache)) if quantized else (k_cache, v_cache)
    keys = mx.concatenate([old_k.astype(mx.float32), k.astype(mx.float32)], axis=2)
    values = mx.concatenate([old_v.astype(mx.float32), v.astype(mx.float32)], axis=2)
    delta = new[:, :, None] - key_pos[:, None, :]
    visible = (key_pos[:, None, :] >= 0) & (delta >= 0) & (delta < W)
    scores = (q.astype(mx.float32) @ keys.transpose(0, 1, 3, 2)) * scale
    scores = mx.where(visible[:, None], scores, -mx.inf)
    out = (mx.softmax(scores, axis=-1) @ values).astype(q.dtype)

    # Slot s takes the last new position that maps to it (only the last W survive).
    hit = ((new[:, :, None] % W) == slots[None, None, :]) & (new[:, :, None] >= (pos + T - W)[:, None, None])
    written = hit.any(axis=1)  # [B, W]
    src = mx.argmax(hit.astype(mx.int32), axis=1)  # [B, W]

    def take(cache, rows):  # rows [B, H, T, ...] into the slots they hit
        tail = (None,) * (rows.ndim - 3)
        return mx.where(written[(slice(None), None, slice(None)) + tail],
                        mx.take_along_axis(rows, src[(slice(None), None, slice(None)) + tail], axis=2), cache)

    def write(cache, rows):
        if quantized:
            return tuple(take(c, r) for c, r in zip(cache, quantize_rows(rows)))
        return take(cache, rows)

    return out, write(k_cache, k), write(v_cache, v)


# ------------------------------------------------------------------------ Mimi codec


def conv1d_stream(x, previous, weight, bias=None, *, stride: int = 1, dilation: int = 1,
                  elu_input: bool = False, groups: int = 1, first=None):
    """One streaming causal conv1d step (see csrc/conv1d_stream.h); returns (y, previous').

    x [B, T, C_in] with T a multiple of stride; previous [B, context, C_in], the last
    context = (K - 1) * dilation + 1 - stride conv inputs (post-ELU); weight
    [C_out, K, C_in / groups]. `first` (bool [B]): 'replicate' padding, where set the
    context is the first new sample repeated.
    """
    if elu_input:
        x = nn.elu(x)
    context = previous.shape[1]
    if context:
        if first is not None:
            repeated = mx.broadcast_to(x[:, :1], previous.shape)
            previous = mx.where(first[:, None, None], repeated, previous)
        x = mx.concatenate([previous, x], axis=1)
        previous = x[:, -context:]
    y = mx.conv1d(x, weight, stride=stride, dilation=dilation, groups=groups)
    return (y if bias is None else y + bias), previous


def conv_transpose1d_stream(x, partial, weight, bias=None, *, stride: int, groups: int = 1,
                            elu_input: bool = False):
    """One streaming transposed conv1d step (see csrc/conv_transpose1d_stream.h);
    returns (y, partial'). partial [B, K - stride, C_out] is the previous step's
    overlap, without bias."""
    if elu_input:
        x = nn.elu(x)
    y = mx.conv_transpose1d(x, weight, stride=stride, groups=groups)
    overlap = partial.shape[1]
    if overlap:
        head = y[:, :overlap] + partial
        y = mx.concatenate([head, y[:, overlap:]], axis=1)
        partial = y[:, -overlap:]
        y = y[:, :-overlap]
    return (y if bias is None else y + bias), partial


def rvq_encode(x, codebooks):
    """Residual VQ: codes [..., n_q] int32 of x [..., D] over codebooks [n_q, bins, D].

    float32 throughout; distances |r|^2 - 2 r.e + |e|^2 (|r|^2 kept to round like
    moshi's cdist); ties go to the lowest index (mx.argmin)."""
    residual = x.astype(mx.float32)
    codebooks = codebooks.astype(mx.float32)
    codes = []
    for book in codebooks:
        dist = ((residual * residual).sum(-1, keepdims=True) - 2 * (residual @ book.T)
                + (book * book).sum(-1))
        c = mx.argmin(dist, axis=-1).astype(mx.int32)
        residual = residual - book[c]
        codes.append(c)
    return mx.stack(codes, axis=-1)


def rvq_decode(codes, codebooks):
    """Sum over q of codebooks[q, codes[..., q]]: [..., D] float32; codes are clamped
    to the codebook (as the kernels do: an unchecked take would read past it)."""
    codebooks = codebooks.astype(mx.float32)
    codes = mx.clip(codes, 0, codebooks.shape[1] - 1)
    total = codebooks[0][codes[..., 0]]
    for q in range(1, codebooks.shape[0]):
        total = total + codebooks[q][codes[..., q]]
    return total


def matvec(x, w, scales=None, biases=None, *, bits: int = 0, alpha=None, eps: float = 1e-8,
           gate: bool = False, residual=None):
    """A linear layer with its neighbours (see csrc/matvec.h), as the model spells it.

    x [..., K]; w dense [N, K] (bits 0) or MLX affine-quantized (bits 4 / 8, group 64,
    with scales and biases); alpha [K]: RMSNorm of x (float32) in front; gate: SiLU of
    the first half of the outputs times the second half; residual [..., n_out] added last.
    Note MLX's CPU quantized_matmul sums in the storage type (bfloat16 loses ~1e-1 over
    K = 4096); the fused primitive sums in float32 everywhere.
    """
    if alpha is not None:
        x = mx.fast.rms_norm(x.astype(mx.float32), alpha.reshape(-1).astype(mx.float32),
                             eps).astype(x.dtype)
    if bits:
        y = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=64, bits=bits)
    else:
        y = x @ w.T
    return gate_residual(y, gate=gate, residual=residual)


def gate_residual(y, *, gate: bool = False, residual=None):
    """matvec's epilogue on a layer's output y: silu(first half) * second half when
    gated, then + residual."""
    if gate:
        g, v = mx.split(y, 2, axis=-1)
        y = nn.silu(g) * v
    return y if residual is None else residual + y


def project(x, p: Projection, **epilogue):
    """matvec through projection p (epilogue: alpha, eps, gate, residual)."""
    return matvec(x, p.w, p.scales, p.biases, bits=p.bits, **epilogue)


def decoder_layers(x, pos, stack: LayerStack, k_caches, v_caches, *, heads: int,
                   rope_max_period: float | None = 10000.0):
    """One decode step through a stack of layers (see csrc/decoder_layers.h).

    x [B, C]; caches [B, heads, W, C / heads] per layer. Returns (y [B, C],
    k_caches', v_caches') as lists.
    """
    B, C = x.shape
    D = C // heads
    eps = stack.eps
    ks, vs = [], []
    for layer, w in enumerate(stack.layers):
        qkv = project(x, w.in_proj, alpha=w.norm1, eps=eps).reshape(B, 1, 3, heads, D)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))
        out, kc, vc = ring_attention(q, k, v, k_caches[layer], v_caches[layer], pos,
                                     rope_max_period=rope_max_period)
        ks.append(kc)
        vs.append(vc)
        x1 = project(out.transpose(0, 2, 1, 3).reshape(B, C), w.out_proj, residual=x)
        h = project(x1, w.linear_in, alpha=w.norm2, eps=eps, gate=True)
        x = project(h, w.linear_out, residual=x1)
    return x, ks, vs


def sample_topk(logits, noise=None, forced=None, *, temp: float, top_k: int, greedy: bool = False):
    """Tokens [...] int32 from logits [..., V] (see csrc/sample_topk.h): greedy (or
    temp <= 0) takes the argmax; otherwise the argmax of logits / temp + noise over
    the top_k largest (noise: Gumbel draws, which makes it a draw from
    softmax(logits / temp) restricted to the top k). forced >= 0 replaces the token."""
    if greedy or temp <= 0.0:
        tokens = mx.argmax(logits, axis=-1)
    else:
        s = logits.astype(mx.float32) / temp
        if 0 < top_k < s.shape[-1]:
            kth = mx.min(mx.topk(s, top_k, axis=-1), axis=-1, keepdims=True)
            s = mx.where(s >= kth, s, -mx.inf)
        tokens = mx.argmax(s if noise is None else s + noise, axis=-1)
    tokens = tokens.astype(mx.int32)
    return tokens if forced is None else mx.where(forced >= 0, forced.astype(mx.int32), tokens)


def embed_rows(table, ids):
    """table[ids] with id -1 ("no input") as a zero row; other ids clamped to the table."""
    rows = table[mx.clip(ids, 0, table.shape[0] - 1)]
    return mx.where((ids == -1)[..., None], mx.zeros((), rows.dtype), rows)


def step_part(parts: tuple, k: int):
    """Step k's entry of a per-step tuple, or its one entry shared by every step."""
    return parts[k if len(parts) > 1 else 0]


def depformer_frame(h, text, forced, noise, weights: DepformerWeights, *, heads: int,
                    rope_max_period: float | None = None, temp: float = 1.0, top_k: int = 0,
                    greedy: bool = False):
    """All codebook steps of one depformer frame (see csrc/depformer_frame.h).

    h [B, C_in]; text [B]; forced [Q, B] (-1: sample); noise [Q, B, V] float32 or
    None. Returns (codes [Q, B] int32, logits [Q, B, V]).
    """
    Q, B = len(weights.tables), h.shape[0]
    D = weights.tables[0].shape[1]
    L = len(weights.stacks[0].layers)
    ks = [mx.zeros((B, heads, Q, D // heads), h.dtype) for _ in range(L)]
    vs = list(ks)
    prev, codes, logits = text, [], []
    for k in range(Q):
        x = project(h, step_part(weights.in_projs, k))
        x = x + embed_rows(weights.tables[k], prev)
        x, ks, vs = decoder_layers(x, mx.full((B,), k, mx.int32), step_part(weights.stacks, k), ks, vs,
                                   heads=heads, rope_max_period=rope_max_period)
        lk = project(x, weights.heads[k])
        prev = sample_topk(lk, None if noise is None else noise[k], forced[k], temp=temp, top_k=top_k,
                           greedy=greedy)
        codes.append(prev)
        logits.append(lk)
    return mx.stack(codes), mx.stack(logits)
