"""The whole tick as users run it (engine.Engine: one tick program per frame), timed
tick by tick: median and p99 of `--ticks` consecutive ticks after `--warmup`, every
session at a full 3000-frame window, random weights of the official 7B config (or its
structure at negligible widths, --structure), bf16 and 4-bit. Per tick it also
reports the host time (what the Python thread spends before the GPU work is queued:
building the inputs, the one primitive, async_eval) and, for comparison in the same
process, the op-by-op engine (program=False) at the smallest batch.

Also: the codec alone (tick.CodecRunner, Mimi encode + decode of one frame).

    python bench/tick_bench.py --batches 1,8,32,64 --formats 0,4 --json ours.json [--structure]

The official loop runs in its own process: bench/official_loop.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from gpu_common import build_lm, build_mimi, sizes, use_tiny_sizes, versions  # noqa: E402

CONTEXT_FRAME = 3100


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summary(total, host=None):
    out = dict(median=statistics.median(total), p99=percentile(total, 99), min=min(total))
    if host:
        out["host"] = statistics.median(host)
    return out


def op_profile(program):
    """GPU ms per op kind (sum, count) of one tick run op by op outside the graph, the
    second of two runs; the sum over kinds is the kernels' time without the graph."""
    program.profile()
    kinds = {}
    for name, ms in program.profile():
        total, n = kinds.get(name, (0.0, 0))
        kinds[name] = (total + ms, n + 1)
    return {k: [round(v[0], 4), v[1]] for k, v in sorted(kinds.items(), key=lambda kv: -kv[1][0])}


def engine_ticks(lm, mimi, B, ticks, warmup, program=True, profile=False):
    from personaplex_fast.engine import Engine

    engine = Engine(lm, mimi, slots=B, program=program)
    for _ in range(B):
        engine.join()
    engine.tick(np.zeros((B, engine.frame_size), np.float32))  # the joins' resets
    engine.seek(CONTEXT_FRAME if not sizes.TINY else 300)
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
    if profile and run is not None:
        out["profile"] = op_profile(run.program)
    del engine, run
    gc.collect()
    mx.clear_cache()
    return out


def codec_ticks(mimi, B, ticks, warmup, profile=False):
    from personaplex_fast.tick import CodecRunner

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
        out["profile"] = op_profile(run.program)
    del run
    gc.collect()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--formats", default="0,4", help="weight bits: 0 (bf16), 8, 4")
    p.add_argument("--ticks", type=int, default=120)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--per-op-ticks", type=int, default=30, help="op-by-op engine ticks (0: skip)")
    p.add_argument("--structure", action="store_true", help="the 7B's structure at negligible widths")
    p.add_argument("--codec", action="store_true", help="also time the codec alone")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke test)")
    p.add_argument("--profile", action="store_true", help="also each op kind's GPU time (one tick, op by op)")
    p.add_argument("--matvec-small", default="", help="batches also timed with tick.builder.GEMM_MIN_BYTES = 32 MB "
                   "(small weights by matvec up to 8 rows), e.g. 4,8")
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    a = p.parse_args(argv)
    if a.tiny:
        use_tiny_sizes()
    batches = [int(x) for x in a.batches.split(",")]
    result = {"meta": dict(versions=versions(), device=str(mx.default_device()), structure=a.structure,
                           ticks=a.ticks, warmup=a.warmup, date=time.strftime("%Y-%m-%d")), "rows": []}

    def record(row):
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(result, indent=1))

    mimi = build_mimi()
    if a.codec:
        for B in batches:
            record(dict(what="codec", B=B, **codec_ticks(mimi, B, a.ticks, a.warmup, a.profile)))
    for bits in (int(x) for x in a.formats.split(",")):
        lm = build_lm(bits, structure=a.structure)
        fmt = "bf16" if bits == 0 else f"q{bits}"
        if a.per_op_ticks:
            record(dict(what=f"per-op engine {fmt}", B=batches[0],
                        **engine_ticks(lm, mimi, batches[0], a.per_op_ticks, 5, program=False)))
        for B in batches:
            try:
                row = engine_ticks(lm, mimi, B, a.ticks, a.warmup, profile=a.profile)
            except Exception as e:  # out of memory at the largest batches: say so, go on
                row = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            record(dict(what=f"tick {fmt}", B=B, **row))
            if str(B) in a.matvec_small.split(",") and bits == 0:
                from personaplex_fast import tick

                tick.builder.GEMM_MIN_BYTES = 32 << 20
                record(dict(what=f"tick {fmt} (small weights by matvec)", B=B,
                            **engine_ticks(lm, mimi, B, a.ticks, a.warmup, profile=a.profile)))
                tick.builder.GEMM_MIN_BYTES = 0
        del lm
        gc.collect()
        mx.clear_cache()


if __name__ == "__main__":
    main()
