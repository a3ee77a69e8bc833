"""The whole tick as users run it (engine.Engine: one tick program per frame), timed
tick by tick (personaplex_fast.benchmark, which `personaplex-fast bench` runs too):
median and p99 of `--ticks` consecutive ticks after `--warmup`, every session past a
full 3000-frame window, random weights of the official 7B config (or its
structure at negligible widths, --structure), bf16 and 4-bit. Per tick it also
reports the host time (what the Python thread spends before the GPU work is queued:
building the inputs, the one primitive, async_eval) and, for comparison in the same
process, the op-by-op engine (program=False) at the smallest batch.

Also: the codec alone (tick.CodecRunner, Mimi encode + decode of one frame).

    python bench/tick_bench.py --batches 1,8,32,64 --formats 0,4 --json ours.json [--structure]
    python bench/tick_bench.py --batches 64,128 --kv-bits 16,8    # the 8-bit KV cache too

The official loop runs in its own process: bench/official_loop.py.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

from gpu_common import build_lm, build_mimi, use_tiny_sizes, versions  # noqa: E402

from personaplex_fast.benchmark import codec_ticks, engine_ticks  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--formats", default="0,4", help="weight bits: 0 (bf16), 8, 4")
    p.add_argument("--kv-bits", default="16", help="KV cache formats, each timed: 16 (the model's dtype), 8")
    p.add_argument("--ticks", type=int, default=120)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--per-op-ticks", type=int, default=30, help="op-by-op engine ticks (0: skip)")
    p.add_argument("--structure", action="store_true", help="the 7B's structure at negligible widths")
    p.add_argument("--codec", action="store_true", help="also time the codec alone")
    p.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke test)")
    p.add_argument("--profile", action="store_true", help="also each op kind's GPU time (one tick, op by op)")
    p.add_argument("--matvec-small", default="", help="batches also timed with tick.builder.GEMM_MIN_BYTES = "
                   "32 MB (small weights by matvec up to 8 rows), e.g. 4,8")
    p.add_argument("--pdl", default="1", help="programmatic dependent launch in the tick's graph, each timed: "
                   "1 (on, the default), 0 (PERSONAPLEX_PDL=0), e.g. 0,1")
    p.add_argument("--variants", default="", help="each row also timed under these environments, read when a "
                   "tick's graph is captured: NAME:VAR=VALUE,VAR=VALUE;NAME:... (rows named 'tick <format> [NAME]'; "
                   "the base row, as the environment is, comes first unless --no-base)")
    p.add_argument("--no-base", action="store_true", help="with --variants: only the variants")
    p.add_argument("--json", help="write the results here (rewritten after every row)")
    a = p.parse_args(argv)
    if a.tiny:
        use_tiny_sizes()
    batches = [int(x) for x in a.batches.split(",")]
    variants = [] if a.variants and a.no_base else [("", {})]
    for v in filter(None, a.variants.split(";")):
        name, _, env = v.partition(":")
        variants.append((name, dict(kv.split("=", 1) for kv in filter(None, env.split(",")))))
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
            for kv, pdl, (vname, venv) in ((int(x), y, v) for x in a.kv_bits.split(",") for y in a.pdl.split(",")
                                           for v in variants):
                kv_bits, name = (8, f"tick {fmt} kv8") if kv == 8 else (None, f"tick {fmt}")
                saved = {k: os.environ.get(k) for k in venv}
                os.environ.update(venv)
                os.environ["PERSONAPLEX_PDL"] = pdl  # read when the engine's graph is captured
                try:
                    row = engine_ticks(lm, mimi, B, a.ticks, a.warmup, program=True, profile=a.profile,
                                       kv_bits=kv_bits)
                except Exception as e:  # out of memory at the largest batches: say so, go on
                    row = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
                finally:
                    for k, old in saved.items():
                        if old is None:
                            os.environ.pop(k, None)
                        else:
                            os.environ[k] = old
                record(dict(what=name + (" no-pdl" if pdl == "0" else "") + (f" [{vname}]" if vname else ""),
                            B=B, **({"env": venv} if venv else {}), **row))
            os.environ.pop("PERSONAPLEX_PDL", None)
            if str(B) in a.matvec_small.split(",") and bits == 0:
                from personaplex_fast import tick

                tick.builder.GEMM_MIN_BYTES = 32 << 20
                record(dict(what=f"tick {fmt} (small weights by matvec)", B=B,
                            **engine_ticks(lm, mimi, B, a.ticks, a.warmup, program=True, profile=a.profile)))
                tick.builder.GEMM_MIN_BYTES = 0
        del lm
        gc.collect()
        mx.clear_cache()


if __name__ == "__main__":
    main()
