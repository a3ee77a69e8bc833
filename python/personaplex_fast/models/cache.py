"""Streaming state of the transformers: a ring KV cache per layer.

The cache is a plain object the caller holds, one row per session. Position p of
a session lives in slot p % capacity; which slots are valid is decided by the
attention from each session's own position, so resetting a session only means
resetting its position (stale slots are never read again).
"""

from __future__ import annotations

import mlx.core as mx

from .. import ops


class RingKVCache:
    def __init__(self, num_layers: int, batch: int, num_heads: int, capacity: int,
                 head_dim: int, dtype: mx.Dtype):
        shape = (batch, num_heads, capacity, head_dim)
        self.keys = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [mx.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.capacity = capacity

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

    def arrays(self) -> list[mx.array]:
        return self.keys + self.values

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays())
