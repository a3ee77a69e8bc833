"""The official loop, timed tick by tick: Kyutai's moshi run the way its server runs it,
`mimi.encode` -> `LMGen.step` -> `mimi.decode` per 80 ms frame, with moshi's own CUDA
graphs and torch.compile, on random weights of the official 7B config (or its structure
with negligible widths, --structure), every session's KV cache at a full window.

Each tick is timed on the host between two torch.cuda.synchronize() calls (the server
must have the frame's audio before it can send it): median and p99 of `--ticks`
consecutive ticks after `--warmup`. Its own process: run it before or after
bench/tick_bench.py, never in the same one (the two frameworks would share the GPU's
memory). moshi comes from .dev-torch/ as for bench/torch_bench.py.

    python bench/official_loop.py --batches 1,8,32,64 --json official.json [--structure]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from torch_bench import Bench, fill_context, import_moshi  # noqa: E402

# The 7B's structure (32 temporal layers, a 6-layer depformer over 8 codebooks, the full
# Mimi) with widths that make its bytes negligible: what is left is fixed cost.
STRUCTURE_LM = dict(dim=256, num_heads=2, depformer_dim=128, depformer_num_heads=2,
                    depformer_dim_feedforward=int(4.125 * 128))


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def loop_ticks(b: Bench, B: int, ticks: int, warmup: int) -> list[float]:
    mimi, gen = b.mimi(), b.lm_gen()
    pcm = 0.1 * b.randn(B, 1, mimi.frame_size, dtype=b.mimi_dtype)
    times = []
    with b.moshi_graphs(), mimi.streaming(B), gen.streaming(B):
        fill_context(gen.lm_model.transformer, b.context)
        for i in range(warmup + ticks):
            b.sync()
            t = time.perf_counter()
            out = gen.step(mimi.encode(pcm))
            if out is not None:
                mimi.decode(out[:, 1:])
            b.sync()
            if i >= warmup:
                times.append(1e3 * (time.perf_counter() - t))
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--ticks", type=int, default=120)
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--context", type=int, default=3000)
    p.add_argument("--structure", action="store_true", help="the 7B's structure at negligible widths")
    p.add_argument("--json", help="write the results here (rewritten after every batch)")
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU, no graphs (a smoke test)")
    a = p.parse_args(argv)
    m, _ = import_moshi()
    device = torch.device("cpu" if a.tiny else "cuda")
    from torch import _dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # one compiled entry per B, as torch_bench
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, 64)
            break
    torch.manual_seed(0)
    b = Bench(m, device, torch.float32 if a.tiny else torch.bfloat16, torch.float32,
              min(a.context, 16) if a.tiny else a.context, a.ticks, a.tiny, not a.tiny, not a.tiny)
    if a.structure:
        b.lm_kwargs.update(STRUCTURE_LM)
    meta = dict(torch=torch.__version__, moshi=m.version,
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                date=time.strftime("%Y-%m-%d"), structure=a.structure, context=a.context, ticks=a.ticks,
                warmup=a.warmup, lm=b.lm_kwargs)
    rows = {}
    if a.tiny:
        torch.set_num_threads(1)  # at tiny widths, threads only wait on each other
    with torch.no_grad(), (m.compile.no_compile() if a.tiny else contextlib.nullcontext()):
        for B in (int(x) for x in a.batches.split(",")):
            try:
                t = loop_ticks(b, B, a.ticks, a.warmup)
                rows[B] = dict(median=statistics.median(t), p99=percentile(t, 99), min=min(t))
            except torch.cuda.OutOfMemoryError as e:
                rows[B] = dict(error=f"out of memory: {str(e).splitlines()[0]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"official loop{' (structure)' if a.structure else ''} B={B}: {rows[B]}", flush=True)
            if a.json:
                Path(a.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
