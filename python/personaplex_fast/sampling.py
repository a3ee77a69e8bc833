"""Token sampling: temperature + top-k, or greedy, on the device.

Sampling is done with the Gumbel-max trick (argmax of logits / temp + Gumbel
noise), which draws from softmax(logits / temp) without a host round trip; the
top-k restriction masks everything below the k-th largest logit first.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import ops


@dataclass(frozen=True)
class SamplingConfig:
    # Official defaults (moshi LMGen): text 0.7 / top 25, audio 0.8 / top 250.
    temp_text: float = 0.7
    topk_text: int = 25
    temp_audio: float = 0.8
    topk_audio: int = 250
    greedy: bool = False


def gumbel_noise(shape, greedy: bool, temp: float, key: mx.array | None) -> mx.array | None:
    """The Gumbel draws sample_topk adds, or None when the pick is greedy."""
    if greedy or temp <= 0.0:
        return None
    return mx.random.gumbel(shape=shape, key=key)


def sample(logits: mx.array, temp: float, top_k: int, greedy: bool, key: mx.array | None,
           forced: mx.array | None = None) -> mx.array:
    """logits [..., V] -> int32 tokens [...]; forced >= 0 replaces the token."""
    noise = gumbel_noise(logits.shape, greedy, temp, key)
    return ops.sample_topk(logits, noise, forced, temp=temp, top_k=top_k, greedy=greedy)
