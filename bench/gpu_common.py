"""What bench/gpu_bench.py and bench/gpu_primitives.py share: the sizes (the 7B's, or
the tiny model's with --tiny), timing, the bandwidth floor and the table format."""

from __future__ import annotations

import datetime
import statistics
import subprocess
import time
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

# Attention heads, head dim and window of the 7B; the sessions' position (past the
# window, so it is full); TINY: the CPU smoke test of the script (use_tiny_sizes).
sizes = SimpleNamespace(H=32, D=128, W=3000, CONTEXT_FRAME=3100, TINY=False)


def use_tiny_sizes() -> None:
    sizes.H, sizes.D, sizes.W, sizes.CONTEXT_FRAME, sizes.TINY = 2, 64, 40, 300, True


def median_ms(step, warmup=3, iters=20):
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


def copy_bandwidth(mib=2048):
    x = mx.random.normal((mib * 2**19,), dtype=mx.float32).astype(mx.bfloat16)
    mx.eval(x)
    ms = median_ms(lambda: mx.eval(x * 1), iters=20)  # an elementwise pass: read + write
    return 2 * x.nbytes / (ms * 1e-3)


def param_bytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def bf16(rng, shape):
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(mx.bfloat16)


class Table:
    """Rows of one level: name, B, ours, reference, torch, floor (ms)."""

    def __init__(self, title, bw, torch_rows):
        self.title, self.bw, self.torch_rows, self.rows = title, bw, torch_rows, []

    def add(self, name, B, ours, ref=None, floor_bytes=None, torch_key=None, note=""):
        floor = 1e3 * floor_bytes / self.bw if floor_bytes else None
        tb = self.torch_rows.get(torch_key, {}).get(str(B)) if torch_key else None
        self.rows.append((name, B, ours, ref, tb, floor, note))
        print(self.lines()[-1], flush=True)

    def lines(self):
        out = [self.title, "",
               "| what | B | ours | pure MLX | PyTorch + CUDA graph | floor | ours / floor | MLX / ours | torch / ours | note |",
               "|---|---|---|---|---|---|---|---|---|---|"]
        f = lambda v, d=3: "-" if v is None else (v if isinstance(v, str) else f"{v:.{d}f}")
        for name, B, ours, ref, tb, floor, note in self.rows:
            tv = tb if isinstance(tb, (int, float)) else None
            out.append(f"| {name} | {B} | {f(ours)} | {f(ref)} | {f(tb) if tb is not None else '-'} | {f(floor)} "
                       f"| {f(ours / floor if floor else None, 2)} | {f(ref / ours if ref else None, 1)} "
                       f"| {f(tv / ours if tv else None, 2)} | {note} |")
        return out


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


def show(table):
    """Print a finished table at once (a run cut short keeps what it measured)."""
    print("\n".join(table.lines()), flush=True)


def structure_config():
    """The 7B's layers (32 temporal, the depformer's 6 over 8 codebooks, the 3000-frame
    window, the official cards) at negligible widths."""
    from personaplex_fast.config import DepformerConfig, LMConfig

    return LMConfig(dim=256, num_heads=2, depformer=DepformerConfig(dim=128, num_heads=2,
                                                                    dim_feedforward=int(4.125 * 128)))


def build_lm(bits, structure=False):
    """The 7B LM with random weights in bf16 (bits: 4 or 8 quantizes it as `convert`
    does); structure: the 7B's layers at negligible widths; the tiny model with --tiny."""
    from personaplex_fast.benchmark import random_lm
    from personaplex_fast.config import LMConfig

    if sizes.TINY:
        from personaplex_fast.tiny import TINY as cfg
    else:
        cfg = structure_config() if structure else LMConfig()
    return random_lm(cfg, bits)


def build_mimi():
    from personaplex_fast.benchmark import random_mimi

    if sizes.TINY:
        from personaplex_fast.mimi_checkpoint import tiny_mimi_config
        return random_mimi(tiny_mimi_config())
    return random_mimi()
