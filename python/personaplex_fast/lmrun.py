"""`lm-run`: step the LM alone on user silence, print tokens and the step time.

A smoke test for a checkpoint (real weights by HF name, or a tiny one) before
the codec and the duplex engine are involved.
"""

from __future__ import annotations

import time

import mlx.core as mx

from .checkpoint import load_lm
from .sampling import SamplingConfig


def run(model: str, frames: int = 100, seed: int = 0, greedy: bool = False, batch: int = 1,
        kv_bits: int | None = None) -> None:
    """kv_bits 8: the KV cache in 8 bits (op by op, its attention runs the pure-MLX reference)."""
    lm = load_lm(model)
    state = lm.new_state(batch, seed=seed, kv_bits=kv_bits)
    # The user's stream is the initial (silence-free) token on every codebook:
    # enough to exercise every layer without a codec.
    user = mx.full((batch, lm.cfg.user_q), lm.cfg.audio_initial_token - 1, dtype=mx.int32)
    sampling = SamplingConfig(greedy=greedy)
    times, texts = [], []
    for _ in range(frames):
        t0 = time.perf_counter()
        out = lm.step(state, user, sampling)
        mx.eval(out.text, out.audio)
        times.append(time.perf_counter() - t0)
        texts.append(out.text[0].item())
    steady = sorted(times[len(times) // 4:]) or times
    print(f"{frames} frames, batch {batch}: median step {1e3 * steady[len(steady) // 2]:.2f} ms "
          f"(real time needs < 80 ms)")
    print("text tokens (session 0):", " ".join(str(t) for t in texts if t >= 0))
