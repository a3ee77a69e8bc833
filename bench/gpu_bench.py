"""GPU benchmark: ring_attention at the 7B temporal shape, and one whole 7B LM step.

Run on a CUDA machine: `python bench/gpu_bench.py [--lm] [--markdown FILE]`.
Prints one table: fused kernel vs the pure-MLX reference vs MLX's own
scaled_dot_product_attention over the same KV (no ring, no RoPE, no cache write:
a yardstick), against the bandwidth floor (bytes of K and V read, plus the
writes, at the device-to-device copy bandwidth measured in this run).
Times are medians of host wall time around mx.eval + mx.synchronize.
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import subprocess
import time

import mlx.core as mx
import numpy as np

from personaplex_fast import _ext, ops, reference

H, D, W = 32, 128, 3000


def median_ms(step, warmup=5, iters=30):
    for _ in range(warmup):
        step()
    mx.synchronize()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        mx.synchronize()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def copy_bandwidth(gib=2):
    x = mx.random.normal((gib * 2**29,), dtype=mx.float32).astype(mx.bfloat16)
    mx.eval(x)
    ms = median_ms(lambda: mx.eval(x * 1), iters=20)  # an elementwise pass: read + write
    return 2 * x.nbytes / (ms * 1e-3)


def ring_rows(B, bw):
    rng = np.random.default_rng(B)

    def rand(shape):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)

    inputs = [[rand((B, H, 1, D)) for _ in range(3)] for _ in range(4)]
    state = {"kc": rand((B, H, W, D)), "vc": rand((B, H, W, D)), "p": 2 * W, "i": 0}
    mx.eval(inputs, state["kc"], state["vc"])

    def decode(fn):
        def step():
            q, k, v = inputs[state["i"] % len(inputs)]
            pos = mx.full((B,), state["p"], dtype=mx.int32)
            out, state["kc"], state["vc"] = fn(q, k, v, state["kc"], state["vc"], pos)
            mx.eval(out, state["kc"], state["vc"])
            state["p"] += 1
            state["i"] += 1
        return step

    copies, waits = _ext.ring_cache_copies(), _ext.ring_cache_waits()
    fused = median_ms(decode(ops.ring_attention))
    copies, waits = _ext.ring_cache_copies() - copies, _ext.ring_cache_waits() - waits
    ref = median_ms(decode(reference.ring_attention), iters=10)
    q = inputs[0][0]
    sdpa = median_ms(lambda: mx.eval(mx.fast.scaled_dot_product_attention(
        q, state["kc"], state["vc"], scale=1 / math.sqrt(D))))
    kv_bytes = 2 * B * H * W * D * 2 + 3 * B * H * D * 2 * 2
    floor = 1e3 * kv_bytes / bw
    return {"B": B, "fused": fused, "reference": ref, "sdpa": sdpa, "floor": floor,
            "GB": kv_bytes / 1e9, "copies": copies, "waits": waits}


def lm_step_rows(batches, context):
    from personaplex_fast.config import LMConfig
    from personaplex_fast.models.lm import LM

    lm = LM(LMConfig())
    lm.set_dtype(mx.bfloat16)
    mx.eval(lm.parameters())
    rows = []
    for B in batches:
        res = {"B": B}
        for mode in ("fused", "reference"):
            with ops.use_mode(mode):
                state = lm.new_state(B)
                state.offsets = mx.full((B,), context, dtype=mx.int32)
                rng = np.random.default_rng(0)
                user = mx.array(rng.integers(0, 2048, (B, lm.cfg.user_q)).astype(np.int32))

                def step():
                    out = lm.step(state, user)
                    mx.eval(out.text, out.audio)

                res[mode] = median_ms(step, warmup=5, iters=20)
        rows.append(res)
    return rows


def versions():
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except OSError:
        smi = "nvidia-smi not found"
    try:
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip().splitlines()[-1]
    except OSError:
        nvcc = "nvcc not found"
    return f"{smi}; MLX {mx.__version__}; {nvcc}; {datetime.date.today().isoformat()}"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--lm", action="store_true", help="also time one whole 7B LM step")
    parser.add_argument("--lm-batches", default="1,8")
    parser.add_argument("--markdown", help="append the tables to this file")
    args = parser.parse_args()

    lines = [f"Device: {versions()}", ""]
    bw = copy_bandwidth()
    lines += [f"Copy bandwidth (bf16 x*1, 2 GiB, read + write): {bw / 1e12:.2f} TB/s", "",
              f"ring_attention, bf16, H={H}, D={D}, W={W} full window, T=1 (decode), ms per call:", "",
              "| B | fused | reference (pure MLX) | MLX sdpa, same KV | floor | KV GB | fused / floor | cache copies | waits |",
              "|---|---|---|---|---|---|---|---|---|"]
    for B in [int(b) for b in args.batches.split(",")]:
        r = ring_rows(B, bw)
        lines.append(f"| {B} | {r['fused']:.3f} | {r['reference']:.3f} | {r['sdpa']:.3f} | {r['floor']:.3f} "
                     f"| {r['GB']:.3f} | {r['fused'] / r['floor']:.2f} | {r['copies']} | {r['waits']} |")
        print(lines[-1], flush=True)
    if args.lm:
        context = 3100
        lines += ["", f"Whole 7B LM step (LMConfig(), random weights, bf16, sessions at frame {context}), ms:", "",
                  "| B | fused | reference |", "|---|---|---|"]
        for r in lm_step_rows([int(b) for b in args.lm_batches.split(",")], context):
            lines.append(f"| {r['B']} | {r['fused']:.2f} | {r['reference']:.2f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
