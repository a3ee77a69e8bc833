"""Streaming state of the transformers: a ring KV cache per layer.

The cache is a plain object the caller holds, one row per session. Position p of
a session lives in slot p % capacity; which slots are valid is decided by the
attention from each session's own position, so resetting a session only means
resetting its position (stale slots are never read again).

bits=8 keeps each layer's keys and values as 8-bit rings: (int8 codes [B, H, W, D],
float32 scales [B, H, W]) pairs, one scale per (session, head, position), quantized
as rows enter the ring (reference.quantize_rows). That halves the 7B's 1.57 GB a
session (the README has the format's choice and its measured error).
"""

from __future__ import annotations

import mlx.core as mx

from .. import ops, reference

KV_BITS = (8,)  # the formats besides the activations' own (bits=None)


class RingKVCache:
    def __init__(self, num_layers: int, batch: int, num_heads: int, capacity: int,
                 head_dim: int, dtype: mx.Dtype, bits: int | None = None):
        if bits not in (None, *KV_BITS):
            raise ValueError(f"KV cache bits must be one of {KV_BITS} or None (the activations' dtype), got {bits}")
        shape = (batch, num_heads, capacity, head_dim)

        def ring():
            if bits == 8:
                return mx.zeros(shape, dtype=mx.int8), mx.zeros(shape[:3], dtype=mx.float32)
            return mx.zeros(shape, dtype=dtype)

        self.keys = [ring() for _ in range(num_layers)]
        self.values = [ring() for _ in range(num_layers)]
        self.capacity = capacity
        self.bits = bits

    def attend(self, layer: int, q: mx.array, k: mx.array, v: mx.array, pos: mx.array,
               rope_max_period: float | None) -> mx.array:
        """Attention of the new positions over the window, writing k, v into the ring.

        The old cache arrays are replaced here, before evaluation, so that this
        object holds no reference to them: that lets the primitive reuse their
        buffers instead of copying the whole cache every step.
        """
        out, self.keys[layer], self.values[layer] = ops.ring_attention(
            q, k, v, self.keys[layer], self.values[layer], pos,
            rope_max_period=rope_max_period)
        return out

    def rows(self, session: int, bits: int | None) -> tuple[list, list]:
        """One session's rings (keys, values per layer) in format `bits`: as held, or a
        ring of the activations' dtype quantized to 8 bits (a prompt prefilled in bf16
        joining an 8-bit engine)."""
        def row(ring):
            if isinstance(ring, tuple):
                return tuple(a[session] for a in ring)
            return reference.quantize_rows(ring[session]) if bits == 8 else ring[session]

        if bits != self.bits and not (self.bits is None and bits == 8):
            raise ValueError(f"a {self.bits}-bit KV cache cannot be loaded as {bits}")
        return [row(r) for r in self.keys], [row(r) for r in self.values]

    def load(self, slot: int, keys: list, values: list) -> None:
        """Puts one session's rings (rows(...) in this cache's format) into `slot`."""
        for rings, new in ((self.keys, keys), (self.values, values)):
            for ring, row in zip(rings, new):
                for a, r in (zip(ring, row) if isinstance(ring, tuple) else ((ring, row),)):
                    a[slot] = r

    def arrays(self) -> list[mx.array]:
        return [a for ring in self.keys + self.values for a in (ring if isinstance(ring, tuple) else (ring,))]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())
