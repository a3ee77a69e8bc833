"""Token sampling: temperature + top-k, or greedy, on the device.

Sampling is done with the Gumbel-max trick (argmax of logits / temp + Gumbel
noise), which draws from softmax(logits / temp) without a host round trip; the
top-k restriction masks everything below the k-th largest logit first.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplingConfig:
    # Official defaults (moshi LMGen): text 0.7 / top 25, audio 0.8 / top 250.
    temp_text: float = 0.7
    topk_text: int = 25
    temp_audio: float = 0.8
    topk_audio: int = 250
    greedy: bool = False


def sample(logits: mx.array, temp: float, top_k: int, greedy: bool, key: mx.array | None) -> mx.array:
    """logits [..., V] -> int32 tokens [...]."""
    if greedy or temp <= 0.0:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    logits = logits.astype(mx.float32) / temp
    if 0 < top_k < logits.shape[-1]:
        kth = mx.min(mx.topk(logits, top_k, axis=-1), axis=-1, keepdims=True)
        logits = mx.where(logits >= kth, logits, -mx.inf)
    noise = mx.random.gumbel(shape=logits.shape, key=key)
    return mx.argmax(logits + noise, axis=-1).astype(mx.int32)
