"""matvec at the 7B's projection shapes for 1 to 64 rows of x, on CUDA: the tensor-core
path (kernels/matvec_tc.cuh), the streaming kernel (kernels/matvec.cuh, which re-reads
the weights per 8 rows), MLX's own matmul / quantized_matmul (with the norm, gate and
residual as MLX ops: reference.matvec) and the floor (the weights' bytes at the copy
bandwidth measured in this run).

GPU time per call: `--calls` calls in one graph, each on its own copy of the weights
(so no call finds the previous one's weights in the 50 MB L2), divided by the calls.
The path is picked per call with PERSONAPLEX_MATVEC_TC_MIN_ROWS (1: tensor cores at
every row count; 65: the streaming kernel).

    python bench/matvec_tc_bench.py [--batches 1,8,32,64] [--bits 0,4,8] [--json FILE]
        [--depformer] [--splits 1,2,4,8]

--splits times the tensor-core path once per split count along K
(PERSONAPLEX_MATVEC_TC_SPLITS; 0 is the launch plan's rule, `fill` the earlier one) instead of the four
paths; --depformer adds the depformer's shapes (1024 wide, 8 rows a session).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from gpu_common import bf16, copy_bandwidth, median_ms, versions  # noqa: E402
from gpu_primitives import DEPFORMER_SHAPES, MATVEC_SHAPES  # noqa: E402
from personaplex_fast import _ext, reference  # noqa: E402

FORMAT = {0: "bf16", 4: "q4", 8: "q8"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--bits", default="0,4,8")
    p.add_argument("--calls", type=int, default=8)
    p.add_argument("--json")
    p.add_argument("--tiny", action="store_true", help="the shapes scaled down (a smoke test on the CPU)")
    p.add_argument("--depformer", action="store_true", help="the depformer's projections too")
    p.add_argument("--splits", help="split counts to time the tensor-core path at (0: the rule, fill: the "
                   "earlier rule)")
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    shapes = MATVEC_SHAPES + (DEPFORMER_SHAPES if a.depformer else [])
    sweep = a.splits.split(",") if a.splits else None
    if a.tiny:
        shapes = [(name, -(-K // 4096) * 256, N // 16, *rest) for name, K, N, *rest in shapes]
    bw = copy_bandwidth(64 if a.tiny else 2048)
    rows = []
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; {versions()}", flush=True)
    if sweep:
        names = [f"splits {'rule' if v == '0' else v}" for v in sweep]
        print("| shape | format | rows | " + " | ".join(names) + " | floor |")
        print("|---|---|---|" + "---|" * (len(sweep) + 1))
    else:
        print("| shape | format | rows | tensor cores | streaming | MLX | floor | tc vs floor |")
        print("|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for si, (name, K, N, gate, norm, res, _) in enumerate(shapes):
        alpha = mx.ones((K,), dtype=mx.bfloat16) if norm else None
        for bits in [int(b) for b in a.bits.split(",")]:
            weights = []
            for c in range(a.calls):  # drawn on the device: numpy took minutes for the 7B's shapes
                key = mx.random.key(1000 * si + 100 * bits + c)
                w = (mx.random.normal((N, K), key=key) * (1 / math.sqrt(K))).astype(mx.bfloat16)
                weights.append(mx.quantize(w, group_size=64, bits=bits) if bits else (w, None, None))
                mx.eval(weights[-1])
            wbytes = sum(t.nbytes for t in weights[0] if t is not None)
            floor = wbytes / bw * 1e3
            for B in batches:
                xs = [bf16(rng, (B, K)) for _ in range(a.calls)]
                rs = [bf16(rng, (B, N // 2 if gate else N)) if res else None for _ in range(a.calls)]
                mx.eval(xs, [r for r in rs if r is not None])

                def fused(min_rows):
                    def step():
                        os.environ["PERSONAPLEX_MATVEC_TC_MIN_ROWS"] = str(min_rows)
                        mx.eval([_ext.matvec(x, w, s, b, alpha, r, bits, gate, 1e-8)
                                 for x, (w, s, b), r in zip(xs, weights, rs)])
                    return step

                def mlx():
                    mx.eval([reference.matvec(x, w, s, b, bits=bits, alpha=alpha, gate=gate, residual=r)
                             for x, (w, s, b), r in zip(xs, weights, rs)])

                if sweep:
                    times = {}
                    for v in sweep:
                        os.environ["PERSONAPLEX_MATVEC_TC_SPLITS"] = v
                        times[v] = median_ms(fused(1)) / a.calls
                    os.environ.pop("PERSONAPLEX_MATVEC_TC_SPLITS", None)
                    os.environ.pop("PERSONAPLEX_MATVEC_TC_MIN_ROWS", None)
                    rows.append({"shape": name, "format": FORMAT[bits], "rows": B, "floor_ms": floor,
                                 "weight_bytes": wbytes, "splits_ms": times})
                    print(f"| {name} | {FORMAT[bits]} | {B} | " + " | ".join(f"{t:.4f}" for t in times.values())
                          + f" | {floor:.4f} |", flush=True)
                    if a.json:
                        Path(a.json).write_text(json.dumps({"copy_gbps": bw / 1e9, "versions": versions(),
                                                            "rows": rows}, indent=1))
                    continue
                tc = median_ms(fused(1)) / a.calls
                stream = median_ms(fused(65)) / a.calls
                ref = median_ms(mlx) / a.calls
                os.environ.pop("PERSONAPLEX_MATVEC_TC_MIN_ROWS", None)
                rows.append({"shape": name, "format": FORMAT[bits], "rows": B, "tc_ms": tc, "stream_ms": stream,
                             "mlx_ms": ref, "floor_ms": floor, "weight_bytes": wbytes})
                print(f"| {name} | {FORMAT[bits]} | {B} | {tc:.4f} | {stream:.4f} | {ref:.4f} | {floor:.4f} "
                      f"| {tc / floor:.2f}x |", flush=True)
                if a.json:
                    Path(a.json).write_text(json.dumps({"copy_gbps": bw / 1e9, "versions": versions(), "rows": rows},
                                                       indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
