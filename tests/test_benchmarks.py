"""The benchmark suite runs: its pytest-benchmark files once each (no timing), the GPU
table script and the tick script at tiny sizes on the CPU, so none rots between GPU
runs; and `personaplex-fast bench` (personaplex_fast.benchmark, the tick script's code
too) prints the fused and the reference tick side by side with their real-time factors,
the device and the versions. Timings themselves are never asserted."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from personaplex_fast.cli import main

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


def test_tick_bench_and_report_run_tiny(tmp_path):
    """bench/tick_bench.py at tiny sizes on the CPU, and bench/perf_report.py over its JSON."""
    ours = tmp_path / "ours.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tick_bench.py"), "--tiny", "--batches", "1,2", "--formats", "0,4",
         "--ticks", "2", "--warmup", "1", "--per-op-ticks", "2", "--codec", "--profile", "--kv-bits", "16,8",
         "--pdl", "0,1", "--json", str(ours)],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = __import__("json").loads(ours.read_text())["rows"]
    whats = {(r["what"], r["B"]) for r in rows}
    assert {("codec", 1), ("tick bf16", 2), ("tick q4", 1), ("per-op engine bf16", 1), ("tick bf16 kv8", 2),
            ("tick q4 kv8 no-pdl", 1)} <= whats
    assert all(r["median"] > 0 and r["p99"] >= r["median"] and r["profile"] for r in rows if r["what"] == "tick bf16")
    # the profile by section: the tick's named parts, each op in one, the parts' sum the kinds' sum
    for r in rows:
        if r["what"] == "tick bf16":
            sections, kinds = r["sections"], r["profile"]
            assert list(sections) == ["mimi encode", "lm input", "temporal", "text", "depformer", "lm output",
                                      "mimi decode", "state"]
            assert all(n > 0 for _, n in sections.values())
            assert sum(n for _, n in sections.values()) == sum(n for _, n in kinds.values())
            assert abs(sum(ms for ms, _ in sections.values()) - sum(ms for ms, _ in kinds.values())) < 1e-2
        if r["what"] == "codec":
            assert list(r["sections"])[:2] == ["mimi encode", "mimi decode"]
        if "sections" in r:  # and each named part timed alone (median, p99 of its runs)
            assert list(r["graph_sections"]) == [s for s in r["sections"] if s != "state"]
            assert all(0 < med <= p99 for med, p99 in r["graph_sections"].values())
    png = tmp_path / "tick.png"
    report = subprocess.run([sys.executable, str(ROOT / "bench" / "perf_report.py"), "--ours", str(ours),
                             "--plot", str(png)], capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr[-3000:]
    assert "| 2 |" in report.stdout and "whole tick bf16, B=1" in report.stdout
    assert "Real-time sessions (the largest measured batch whose p99 tick is under 80 ms): bf16 " in report.stdout
    assert "| ours bf16, 8-bit KV | ours q4, 8-bit KV |" in report.stdout
    temporal = [l for l in report.stdout.splitlines() if l.startswith("| temporal step q4 in the tick, B=1 |")]
    assert len(temporal) == 1 and float(temporal[0].split("|")[2]) > 0  # from the row's graph_sections
    assert "| q4 faster than bf16 at every batch size |" in report.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_matvec_tc_bench_runs_tiny(tmp_path):
    """bench/matvec_tc_bench.py at shapes scaled down (K to 256 a 4096) on the CPU (where both of
    matvec's GPU paths are the CPU path): a row per shape, format and row count."""
    out = tmp_path / "tc.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "matvec_tc_bench.py"), "--tiny", "--batches", "1,9",
                           "--bits", "0,4", "--calls", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 * 2 * 2
    assert {(r["format"], r["rows"]) for r in rows} == {("bf16", 1), ("bf16", 9), ("q4", 1), ("q4", 9)}
    assert all(r["tc_ms"] > 0 and r["stream_ms"] > 0 and r["mlx_ms"] > 0 and r["floor_ms"] > 0 for r in rows)
    assert "| qkv 4096->12288 +norm | q4 | 9 |" in proc.stdout


def test_matvec_tc_bench_splits_sweep_tiny(tmp_path):
    """--splits: a time per split count for every shape (the depformer's too), format and
    row count, and no other path's."""
    out = tmp_path / "tc.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "matvec_tc_bench.py"), "--tiny", "--batches", "9",
                           "--bits", "4", "--calls", "1", "--depformer", "--splits", "0,fill,3", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 + 7
    assert all(set(r["splits_ms"]) == {"0", "fill", "3"} and min(r["splits_ms"].values()) > 0 for r in rows)
    assert "tc_ms" not in rows[0] and "| dep ffn_in 1024->5632 +norm+gate | q4 | 9 |" in proc.stdout


@pytest.fixture(scope="module")
def perf_report():
    """bench/perf_report.py as a module (bench/ is not a package)."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import perf_report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return perf_report


def test_perf_report_real_time_sessions(perf_report):
    rows = {("tick q4", 1): {"median": 8.0, "p99": 9.1}, ("tick q4", 8): {"median": 29.0, "p99": 79.9},
            ("tick q4", 32): {"median": 70.0, "p99": 80.0}, ("tick bf16", 1): {"median": 81.0, "p99": 90.0},
            ("tick bf16 kv8", 64): {"median": 40.0, "p99": 42.0}, ("tick bf16 kv8", 128): {"error": "OOM"}}
    assert perf_report.real_time_sessions(rows, "tick q4") == "8"
    assert perf_report.real_time_sessions(rows, "tick bf16") == "-"
    assert perf_report.real_time_sessions(rows, "tick bf16 kv8") == "64"
    rows[("tick q4", 32)]["p99"] = 79.0
    assert perf_report.real_time_sessions(rows, "tick q4") == "32 or more"


def test_perf_report_floor(perf_report):
    """The whole tick's floor: 7,687,450,624 parameters of the 7B LM in bf16 and a session's
    1,572,864,000-byte full-window cache, at 4.3 TB/s; with 4-bit weights (group 64: 4.5 bits
    a parameter) and the 8-bit cache (811,008,000 bytes a session) at B = 128."""
    assert perf_report.floor_ms(1) == pytest.approx(1e3 * (2 * 7_687_450_624 + 1_572_864_000) / 4.3e12, rel=1e-12)
    assert perf_report.floor_ms(128, 4, 8) == pytest.approx(
        1e3 * (4.5 / 8 * 7_687_450_624 + 128 * 811_008_000) / 4.3e12, rel=1e-12)


def test_official_loop_runs_tiny(tmp_path):
    """bench/official_loop.py (moshi's loop, tick by tick) at tiny widths on the CPU."""
    out = tmp_path / "official.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "official_loop.py"), "--tiny", "--batches", "1,2",
                           "--ticks", "3", "--warmup", "1", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = __import__("json").loads(out.read_text())["rows"]
    assert set(rows) == {"1", "2"} and all(r["median"] > 0 for r in rows.values())


def test_bench_prints_fused_and_reference_ticks(capsys, tmp_path):
    out = tmp_path / "bench.json"
    main(["bench", "--tiny", "--q-bits", "4", "--batch", "2", "--ticks", "3", "--warmup", "1", "--json", str(out)])
    text = capsys.readouterr().out
    assert "random weights, tiny model, 4-bit LM; 2 session(s); 3 consecutive ticks" in text
    assert "MLX " in text and "personaplex_fast " in text and "cpu: " in text
    fused, ref = (next(line for line in text.splitlines() if line.startswith(p)) for p in ("fused ", "reference "))
    assert "the tick program" in fused and "op by op" in ref
    r = json.loads(out.read_text())
    for path in ("fused", "reference"):
        row = r["rows"][path]
        assert 0 < row["median"] <= row["p99"]
        assert f"{row['median'] / 80:.3f}" in (fused if path == "fused" else ref)  # the real-time factor


def test_serve_sessions_runs_tiny(tmp_path):
    """bench/serve_sessions.py (real-time sessions held by `serve` and `serve --replicas 1`)
    on a tiny checkpoint: every session streams and is measured (held or not is timing)."""
    import importlib.util

    modes = "serve,replicas" if importlib.util.find_spec("ray") else "serve"
    out = tmp_path / "sessions.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "serve_sessions.py"), "--tiny", "--modes", modes,
                           "--counts", "2", "--seconds", "2", "--warmup", "1", "--json", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = __import__("json").loads(out.read_text())["modes"]
    assert set(report) == set(modes.split(","))
    for mode in report.values():
        (row,) = mode["rows"]
        assert len(row["results"]) == 2 and all(r.get("rate", 0) > 0 for r in row["results"]), row


def test_switch_interval_bench_runs(tmp_path):
    """bench/switch_interval.py: one row per (busy threads, interval), each tick at least
    the time it slept."""
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "switch_interval.py"), "--busy", "1",
                           "--intervals", "2,0.5", "--ticks", "3", "--sleep-ms", "5", "--handoffs", "2"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 1 |")]
    assert [float(r[1]) for r in rows] == [2.0, 0.5]
    assert all(float(r[2]) >= 5.0 for r in rows)
