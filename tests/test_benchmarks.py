"""The benchmark suite runs: its pytest-benchmark files once each (no timing), and
the GPU table script at tiny sizes on the CPU, so neither rots between GPU runs.
Timings themselves are never asserted."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_micro_benchmarks_run():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "bench", "--benchmark-disable", "-p",
                           "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"\d+ passed", proc.stdout)


def test_gpu_table_script_runs_tiny(tmp_path):
    md = tmp_path / "perf.md"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--tiny", "--iters", "1", "--batches", "1,2",
         "--ref-batches", "1", "--formats", "0,4", "--sections", "primitives,kernels,lm,frame",
         "--markdown", str(md)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = md.read_text()
    for row in ("ring_attention", "matvec qkv", "conv1d 64->128", "conv_transpose1d", "rvq_encode",
                "rvq_decode", "ring_attention, in graph", "temporal step bf16", "depformer 8 codebooks q4",
                "LM step", "Mimi encode", "Mimi decode", "whole frame bf16", "whole frame q4"):
        assert f"| {row}" in text, row
    # Every row of every table has a positive time in the "ours" column.
    rows = [l for l in text.splitlines() if l.startswith("| ") and not l.startswith("| what")]
    assert rows and all(float(l.split("|")[3]) > 0 for l in rows)
