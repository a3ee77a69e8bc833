"""The whole tick as users run it, timed: `personaplex-fast bench` (and bench/tick_bench.py).

engine_ticks times consecutive ticks of engine.Engine (what offline, chat and serve
run: the tick program where it applies, else op by op), every session past a full
context window, and reports their median and p99. `bench` runs it on a model, or on
random weights of the official 7B shape (bf16, or quantized with --q-bits), once
with the fused primitives and once with their pure-MLX references, and prints both
with the real-time factor (the tick's time over the 80 ms frame it makes: below 1 is
faster than real time) and the device and versions, for users to report what the
kernels do on their machine.
"""

from __future__ import annotations

import gc
import json
import platform
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import __version__, ops

FRAME_MS = 80.0
PAST_WINDOW = 100  # frames past the LM's context: every step attends over a full ring


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summary(total, host=None) -> dict:
    out = dict(median=statistics.median(total), p99=percentile(total, 99), min=min(total))
    if host:
        out["host"] = statistics.median(host)
    return out


def random_lm(cfg=None, bits: int | None = None, dtype=mx.bfloat16):
    """An LM of cfg's shape (the official 7B's by default) with MLX's random initial
    weights in dtype, its linears quantized (group 64) with bits 4 or 8 as `convert` does."""
    from .checkpoint import quantizable
    from .config import LMConfig
    from .models.lm import LM

    lm = LM(cfg or LMConfig())
    lm.set_dtype(dtype)
    if bits:
        nn.quantize(lm, group_size=64, bits=bits, class_predicate=quantizable(64))
    mx.eval(lm.parameters())
    return lm


def random_mimi(cfg=None):
    from .models.mimi import Mimi

    mimi = Mimi(cfg) if cfg is not None else Mimi()
    mx.eval(mimi.parameters())
    return mimi


def op_profile(program, sections=()) -> tuple[dict, dict]:
    """GPU ms per op kind (sum, count) of one tick run op by op outside the graph, the
    second of two runs; the sum over kinds is the kernels' time without the graph. And the
    same ops' ms per section (name, first op, end op as the builder counted them, e.g.
    TickRunner.sections, shifted by the program's op_offset), the program's own ops (the
    resets, the counters) as "state"."""
    program.profile()
    times = program.profile()
    kinds = {}
    for name, ms in times:
        total, n = kinds.get(name, (0.0, 0))
        kinds[name] = (total + ms, n + 1)
    by_kind = {k: [round(v[0], 4), v[1]] for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])}
    shift = program.op_offset()
    by_section, covered = {}, set()
    for name, first, end in sections:
        ops = range(first + shift, end + shift)
        by_section[name] = [round(sum(times[i][1] for i in ops), 4), len(ops)]
        covered.update(ops)
    rest = [ms for i, (_, ms) in enumerate(times) if i not in covered]
    if rest and sections:
        by_section["state"] = [round(sum(rest), 4), len(rest)]
    return by_kind, by_section


def section_times(program, sections, reps=30) -> dict:
    """Each section's (name, first op, end op, as op_profile takes them) median and p99 ms,
    its ops run alone `reps` times in a row, on CUDA as a graph of their own captured as the
    tick's (TickProgram.time_range): where a tick's time goes as the graph runs it, not op
    by op. They run on the program's state as a tick would; time the tick before this."""
    shift = program.op_offset()
    out = {}
    for name, first, end in sections:
        s = summary(program.time_range(first + shift, end + shift, reps))
        out[name] = [round(s["median"], 4), round(s["p99"], 4)]
    return out


def engine_ticks(lm, mimi, B, ticks, warmup, program=None, profile=False, kv_bits=None) -> dict:
    """Times `ticks` consecutive ticks (after `warmup`) of an Engine of B sessions, each at
    frame context + PAST_WINDOW: per tick the whole time and, with the tick program, the
    host's part (until its work is queued). program, kv_bits: as Engine takes them (None:
    the engine's choice, the cache in the model's dtype)."""
    from .engine import Engine

    engine = Engine(lm, mimi, slots=B, program=program, kv_bits=kv_bits)
    for _ in range(B):
        engine.join()
    engine.tick(np.zeros((B, engine.frame_size), np.float32))  # the joins' resets
    engine.seek(lm.cfg.context + PAST_WINDOW)
    pcm = (0.1 * np.random.default_rng(B).standard_normal((B, engine.frame_size))).astype(np.float32)
    total, host = [], []
    run = engine.program
    control = mx.zeros((B, 2), mx.int32)
    for i in range(warmup + ticks):
        t0 = time.perf_counter()
        if run is not None:
            audio, tokens = run(mx.array(pcm), control)
            mx.async_eval(audio, tokens)
            t1 = time.perf_counter()
            np.array(audio), np.array(tokens)
        else:
            engine.tick(pcm)
            t1 = None
        t2 = time.perf_counter()
        if i >= warmup:
            total.append(1e3 * (t2 - t0))
            if t1 is not None:
                host.append(1e3 * (t1 - t0))
    out = summary(total, host)
    out["program"] = run is not None
    if profile and run is not None:
        out["profile"], out["sections"] = op_profile(run.program, run.sections)
        out["graph_sections"] = section_times(run.program, run.sections)
    del engine, run
    gc.collect()
    mx.clear_cache()
    return out


def codec_ticks(mimi, B, ticks, warmup, profile=False) -> dict:
    """The codec alone (tick.CodecRunner: Mimi encode + decode of one frame), timed."""
    from .tick import CodecRunner

    run = CodecRunner(mimi, B, gpu=mx.default_device().type == mx.gpu)
    gc.collect()
    pcm = mx.array((0.1 * np.random.default_rng(B).standard_normal((B, mimi.cfg.frame_size))).astype(np.float32))
    reset = mx.zeros((B, 1), mx.int32)
    total = []
    for i in range(warmup + ticks):
        t0 = time.perf_counter()
        out = run(pcm, reset)
        mx.eval(*out)
        if i >= warmup:
            total.append(1e3 * (time.perf_counter() - t0))
    out = summary(total)
    if profile:
        out["profile"], out["sections"] = op_profile(run.program, run.sections)
        out["graph_sections"] = section_times(run.program, run.sections)
    del run
    gc.collect()
    return out


def environment() -> str:
    from .selftest import device_name

    return (f"{device_name()}; MLX {mx.__version__}; personaplex_fast {__version__}; "
            f"{platform.platform()}; Python {platform.python_version()}")


def bench(model: str | None = None, q_bits: int | None = None, batch: int = 1, ticks: int = 60,
          warmup: int = 10, tiny: bool = False, json_path: str | None = None) -> dict:
    """Prints the fused and reference ticks side by side (see the module's docstring);
    returns what it printed as a dict (and writes it to json_path)."""
    if model is not None:
        from .loading import load_model

        m = load_model(model)
        lm, mimi, what = m.lm, m.mimi, model
        if q_bits:
            from .checkpoint import quantizable

            nn.quantize(lm, group_size=64, bits=q_bits, class_predicate=quantizable(64))
            mx.eval(lm.parameters())
    elif tiny:
        from .mimi_checkpoint import tiny_mimi_config
        from .tiny import TINY

        lm, mimi, what = random_lm(TINY, q_bits), random_mimi(tiny_mimi_config()), "random weights, tiny model"
    else:
        lm, mimi, what = random_lm(None, q_bits), random_mimi(), "random weights, official 7B shape"
    what += f", {f'{q_bits}-bit' if q_bits else 'unquantized'} LM"
    rows = {}
    old = ops.mode()
    try:
        for path, mode in (("fused", "fused"), ("reference", "reference")):
            ops.set_mode(mode)
            rows[path] = engine_ticks(lm, mimi, batch, ticks, warmup)
    finally:
        ops.set_mode(old)
    result = dict(model=what, batch=batch, ticks=ticks, warmup=warmup, frame=lm.cfg.context + PAST_WINDOW,
                  environment=environment(), kernels=ops.kernels(), fallbacks=ops.fallbacks(), rows=rows)
    print(report(result))
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=1)
    return result


def report(r: dict) -> str:
    lines = [f"personaplex-fast bench: {r['model']}; {r['batch']} session(s); {r['ticks']} consecutive ticks "
             f"after {r['warmup']}, every session at frame {r['frame']}",
             r["environment"],
             f"{'path':<11}{'median ms':>10}{'p99 ms':>9}{'real-time factor':>18}  how"]
    for path, row in r["rows"].items():
        how = "the tick program (one primitive a tick)" if row["program"] else "op by op"
        if path == "fused" and r["fallbacks"]:
            how += "; on their reference here: " + ", ".join(sorted(r["fallbacks"]))
        lines.append(f"{path:<11}{row['median']:>10.2f}{row['p99']:>9.2f}{row['median'] / FRAME_MS:>18.3f}  {how}")
    lines.append(f"real-time factor: the median tick over the {FRAME_MS:g} ms frame it makes (< 1: faster than "
                 "real time)")
    return "\n".join(lines)
