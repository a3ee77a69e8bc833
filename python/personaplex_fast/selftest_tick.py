"""The self-test's rows for what only the tick program runs (selftest.py has the others).

ring_attention_kv8: the attention op over an 8-bit KV ring (Engine(kv_bits=8)), alone
(tick.ring_attention), against reference.ring_attention over the same (codes, scales),
at the selftest's shapes. tick: the whole program (tick.TickRunner, through Engine)
against the op-by-op engine, a few greedy ticks of a tiny random model.

Both need a tick program on the default device: the CPU, or a GPU of a CUDA build
(Metal has none: the engine runs op by op there), else they have no cases. Their
verdicts keep the engine off the program (ops.program_applies).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from . import ops, reference, tick
from .sampling import SamplingConfig

if TYPE_CHECKING:
    from .selftest import Draw, Shapes

# test_kv8.py's bounds on the rings: scales to this relative error, codes equal but for
# one-step flips (a value a last float32 bit off, through a RoPE angle or a sum in
# another order, that crossed a rounding midpoint) in at most this share of them.
KV8_SCALE_RTOL = 1e-5
KV8_CODE_FLIPS = 0.01

# Ticks compared, and per device (frames whose text tokens must agree, audio tolerance
# per unit of its scale): on the CPU the program runs the same kernels in the same order
# as op by op, so every frame agrees (tests/test_tick.py's converse_alike); on a GPU the
# frames are compared until the first whose text differs (a near-tie of a sum in another
# order parts the conversations), as tests/gpu/test_tick_gpu.py's agree does.
TICK_FRAMES = 6
TICK_AGREE = {"cpu": (TICK_FRAMES, 2e-5), "gpu": (4, 1e-3)}


def program_device() -> bool | None:
    """Whether a tick program runs on the default device's GPU (True) or CPU (False);
    None where it cannot (a GPU without CUDA kernels)."""
    from . import _ext

    if mx.default_device().type == mx.cpu:
        return False
    return True if _ext.cuda_build() else None


def ring_error(got, want) -> float:
    """An 8-bit ring's largest error over its tolerance: of its scales, and of its codes
    the share that flipped (or, where one moved more than a step, the largest step)."""
    from .selftest import worst

    (gc, gs), (wc, ws) = got, want
    scales = worst([gs], [ws], KV8_SCALE_RTOL * np.abs(np.array(ws)) + 1e-30)
    steps = np.abs(np.array(gc).astype(np.int32) - np.array(wc).astype(np.int32))
    flips = float(steps.max(initial=0)) if steps.max(initial=0) > 1 else float((steps > 0).mean()) / KV8_CODE_FLIPS
    return max(scales, flips)


def check_ring_attention_kv8(s: Shapes, d: Draw):
    """test_kv8.py: out as ring_attention's check (test_ring_attention.py's tolerance: the
    old rows dequantized from the same codes on both sides); the rings within ring_error."""
    from .selftest import RING_TOL, worst

    gpu = program_device()
    if gpu is None:
        return
    cfg, B, dt = s.lm, s.batch, s.dtype
    H, D, W = cfg.num_heads, cfg.head_dim, cfg.context
    for T in (1, 4):
        q, k, v = (d.normal((B, H, T, D), dt) for _ in range(3))
        kc, vc = (reference.quantize_rows(d.normal((B, H, W, D), dt)) for _ in range(2))
        pos = mx.array([W + 3 + 5 * b for b in range(B)], mx.int32)  # a wrapped ring
        out, k_ring, v_ring = tick.ring_attention(q, k, v, kc, vc, pos, rope_max_period=cfg.max_period, gpu=gpu)
        want = reference.ring_attention(q, k, v, kc, vc, pos, rope_max_period=cfg.max_period)
        yield f"T={T} out", worst([out], want[:1], RING_TOL[dt] + 6e-8 * (W + 3 + 5 * B + T))
        yield f"T={T} k ring", ring_error(k_ring, want[1])
        yield f"T={T} v ring", ring_error(v_ring, want[2])


def tiny_model(seed: int = 0):
    """The tiny model's LM and Mimi on random weights (tiny.py's), in float32."""
    from .config import MIMI_WEIGHTS
    from .loading import load_model
    from .mimi_checkpoint import write_tiny_mimi
    from .tiny import write_lm

    with tempfile.TemporaryDirectory() as directory:
        write_lm(directory, seed=seed)
        write_tiny_mimi(Path(directory) / MIMI_WEIGHTS, seed=seed)
        model = load_model(directory, dtype=mx.float32)
    return model.lm, model.mimi


def check_tick(s: Shapes, d: Draw):
    """TICK_FRAMES greedy ticks of the tiny model, program against op by op, with the KV
    cache in the model's dtype and in 8 bits: "tokens", the frames short of those that must
    agree (0 passes), and "audio" over the agreeing frames. In float32 (where the GPU's
    program and op-by-op engine are known to agree token for token; the kernels' other
    dtypes are the other rows'), max(batch, GEMM_MIN_ROWS) sessions (a GPU program's
    projections then take its GEMM forms, which no other row runs)."""
    from .engine import Engine
    from .tick.builder import GEMM_MIN_ROWS

    gpu = program_device()
    if gpu is None:
        return
    need, tol = TICK_AGREE["gpu" if gpu else "cpu"]
    lm, mimi = tiny_model()
    B, F = max(s.batch, GEMM_MIN_ROWS), mimi.cfg.frame_size
    t = np.arange(F) / mimi.cfg.sample_rate
    gains = np.linspace(0.2, 1.0, B)[:, None]  # rising tones, a loudness per session, and noise
    pcms = [(0.3 * gains * np.sin(2 * np.pi * (180 + 40 * i) * t) + np.array(d.normal((B, F), scale=0.05)))
            .astype(np.float32) for i in range(TICK_FRAMES)]
    greedy = SamplingConfig(greedy=True)
    for kv_bits in (None, 8):
        # "fused" kernels: the engine consults no verdict while this computes one.
        with ops.use_kernels("fused"), ops.use_mode("fused"):
            engines = [Engine(lm, mimi, slots=B, sampling=greedy, program=program, kv_bits=kv_bits)
                       for program in (True, False)]
            if engines[0].program is None or engines[1].program is not None:
                raise RuntimeError("the engine did not take the program where asked")
            for engine in engines:
                for _ in range(B):
                    engine.join()
            agreed, audio = 0, 0.0
            for pcm in pcms:
                got, want = (engine.tick(pcm) for engine in engines)
                if not (got.text == want.text).all():
                    break
                agreed += 1
                err = np.abs(got.pcm - want.pcm).max() / (tol * max(1.0, np.abs(want.pcm).max()))
                audio = max(audio, float(err) if np.isfinite(got.pcm).all() else float("inf"))
        cache = " kv8" if kv_bits else ""
        yield f"tokens{cache}", float(max(0, need - agreed))
        yield f"audio{cache}", audio
