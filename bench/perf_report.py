"""The whole-tick tables of docs/PERF.md from one lease's JSON files: ours
(bench/tick_bench.py, full and --structure) beside the official loop
(bench/official_loop.py, full and --structure), medians and p99 of consecutive
ticks, and the targets of the tick-cost issue met or missed.

    python bench/perf_report.py --ours ours.json --ours-structure ours_s.json \
        --official official.json --official-structure official_s.json > tables.md

--ours may be given more than once (a second tick_bench run, --kv-bits 8 say: its rows
join the first's). --plot PNG draws tick time against sessions (median, p99 as a band)
for every format measured, the official loop, the bandwidth floor and the 80 ms line
(matplotlib, imported only for it).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(path, empty):
    if isinstance(path, list):  # several --ours files: the first's meta, all their rows
        runs = [load(x, empty) for x in path] or [load(None, empty)]
        return {"rows": [r for run in runs for r in run["rows"]], "meta": runs[0]["meta"]}
    return json.loads(Path(path).read_text()) if path else {"rows": empty, "meta": {}}


# The floor of a whole tick: the temporal transformer's and depformer's weights read once
# (Mimi's, ~0.4 GB of float32, left out: under 0.1 ms) and every session's KV cache at a
# full 3000-frame window, at the H200's measured copy bandwidth (device-to-device, bytes
# read and written: ../.library/device/KINDS.md, 2026-10-28 and 2026-11-04).
COPY_BW = 4.3e12
REAL_TIME_MS = 80.0


def floor_ms(B, weight_bits=16, kv_bits=None):
    from personaplex_fast.config import LMConfig

    cfg = LMConfig()
    per_weight = 2.0 if weight_bits == 16 else weight_bits / 8 + 4 / 64  # group 64: bf16 scale + bias
    return 1e3 * (cfg.parameter_count() * per_weight + cfg.kv_bytes(B, 2, kv_bits)) / COPY_BW


def real_time_sessions(ours, what) -> str:
    """The largest measured B whose p99 tick stays under the 80 ms frame ("-" if none),
    with "or more" when it is the largest batch measured."""
    rows = sorted((B, r) for (w, B), r in ours.items() if w == what)
    ok = [B for B, r in rows if "p99" in r and r["p99"] < REAL_TIME_MS]
    if not ok:
        return "-"
    return f"{max(ok)} or more" if max(ok) == rows[-1][0] else str(max(ok))


def plot(ours, official, meta, path):
    """Tick time against sessions: ours per format, the official loop, the floors, 80 ms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    series = sorted({w for (w, B) in ours if w.startswith("tick") and "(" not in w})
    styles = {"tick bf16": "C0", "tick q4": "C1", "tick bf16 kv8": "C2", "tick q4 kv8": "C3"}
    top = 0.0

    def draw(rows, label, color, marker="o"):
        nonlocal top
        rows = sorted((B, r) for B, r in rows if r and "median" in r)
        if not rows:
            return
        Bs = [B for B, _ in rows]
        med, p99 = [r["median"] for _, r in rows], [r["p99"] for _, r in rows]
        ax.plot(Bs, med, marker=marker, color=color, label=label)
        ax.fill_between(Bs, med, p99, color=color, alpha=0.25, linewidth=0)
        top = max(top, *p99)

    for w in series:
        fmt = w.removeprefix("tick ")
        draw([(B, r) for (x, B), r in ours.items() if x == w], f"ours {fmt.replace('kv8', '+ 8-bit KV')}",
             styles.get(w, None))
    draw(list(official.items()), "official moshi loop, bf16 (CUDA graphs)", "k", marker="s")
    Bs = sorted({B for (_, B) in ours} | set(official))
    if Bs:
        grid = list(range(1, max(Bs) + 1))
        ax.plot(grid, [floor_ms(B) for B in grid], "--", color="0.4", label="floor: bf16 weights + bf16 KV")
        ax.plot(grid, [floor_ms(B, 4, 8) for B in grid], ":", color="0.4", label="floor: 4-bit weights + 8-bit KV")
    ax.axhline(REAL_TIME_MS, color="r", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if Bs:
        ax.set_xticks(Bs, [str(B) for B in Bs])
        ax.text(max(Bs), REAL_TIME_MS * 1.06, "80 ms: a frame, the real-time limit", color="r", fontsize=8,
                ha="right")
    ax.set_xlabel("sessions in the batch (B)")
    ax.set_ylabel("whole tick, ms (median; band to p99)")
    ax.set_title(f"Whole tick, official 7B config, every session at a full window ({meta.get('date', '?')})\n"
                 f"{meta.get('versions', '?')}", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)


def ours_rows(data):
    """{(what, B): row} of tick_bench's records."""
    return {(r["what"], r["B"]): r for r in data["rows"]}


def official_rows(data):
    return {int(B): r for B, r in data.get("rows", {}).items()}


def cell(r, key="median"):
    if not r:
        return "-"
    if "error" in r:
        return "error: " + r["error"][:40]
    return f"{r[key]:.1f}" if key != "median" else f"{r['median']:.2f} / {r['p99']:.2f}"


def ratio(a, b):
    if not a or not b or "median" not in a or "median" not in b:
        return "-"
    return f"{b['median'] / a['median']:.2f}x"


def tick_table(ours, official, title):
    batches = sorted({B for (w, B) in ours if w.startswith("tick")} | set(official))
    kv8 = [w for w in ("tick bf16 kv8", "tick q4 kv8") if any(k[0] == w for k in ours)]
    lines = [f"### {title}", "",
             "| sessions | ours bf16 (median / p99 ms) | ours q4 | " +
             "".join(f"ours {w.split()[1]}, 8-bit KV | " for w in kv8) +
             "official loop bf16 | official / ours bf16 | p99 / median (bf16) | host ms / tick (bf16) |",
             "|---|---|---|" + "---|" * len(kv8) + "---|---|---|---|"]
    for B in batches:
        bf, q4, off = ours.get(("tick bf16", B)), ours.get(("tick q4", B)), official.get(B)
        jitter = f"{bf['p99'] / bf['median']:.2f}" if bf and "median" in bf else "-"
        host = f"{bf['host']:.2f}" if bf and "host" in bf else "-"
        lines.append(f"| {B} | {cell(bf)} | {cell(q4)} | " + "".join(f"{cell(ours.get((w, B)))} | " for w in kv8) +
                     f"{cell(off)} | {ratio(bf, off)} | {jitter} | {host} |")
    return lines


def targets(ours, ours_s, official, official_s):
    def med(rows, key):
        r = rows.get(key)
        return r["median"] if r and "median" in r else None

    def p99r(rows, key):
        r = rows.get(key)
        return r["p99"] / r["median"] if r and "median" in r else None

    def temporal(key):  # the temporal transformer's step inside the tick, its ops alone in a graph
        r = ours.get(key)
        return r["graph_sections"]["temporal"][0] if r and "temporal" in r.get("graph_sections", {}) else None

    # Issue 18's (many sessions); the 8-bit KV rows where tick_bench --kv-bits 8 ran.
    many = [(f"whole tick {fmt}{' kv8' * kv}, B={B}", med(ours, (f"tick {fmt}{' kv8' * kv}", B)), target,
             official.get(B) if fmt == "bf16" and not kv else None)
            for B, bf16, q4 in ((8, 11.0, 9.0), (32, 22.0, 16.0), (64, 35.0, 26.0), (128, 60.0, 50.0))
            for kv in ((False, True) if B < 128 else (True,))
            for fmt, target in (("bf16", bf16), ("q4", q4))
            if kv or ("tick bf16", B) in ours or ("tick q4", B) in ours]
    many = [c for c in many if c[1] is not None or "kv8" not in c[0]]
    checks = [
        ("structure-only tick, B=1", med(ours_s, ("tick bf16", 1)), 2.0, official_s.get(1)),
        ("structure-only tick, B=8", med(ours_s, ("tick bf16", 8)), 3.0, official_s.get(8)),
        ("Mimi encode + decode, B=1", med(ours, ("codec", 1)), 1.5, None),
        ("Mimi encode + decode, B=64", med(ours, ("codec", 64)), 4.0, None),
        ("whole tick bf16, B=1", med(ours, ("tick bf16", 1)), 7.0, official.get(1)),
        ("whole tick q4, B=1", med(ours, ("tick q4", 1)), 5.0, None),
        *many,
        ("temporal step bf16 in the tick, B=1", temporal(("tick bf16", 1)), 4.5, None),
        ("temporal step q4 in the tick, B=1", temporal(("tick q4", 1)), 2.0, None),
    ]
    lines = ["| what | ours (ms) | target | met | official loop (ms) |", "|---|---|---|---|---|"]
    for what, got, target, off in checks:
        met = "-" if got is None else ("yes" if got <= target else f"no, +{got - target:.2f} ms")
        off_ms = f"{off['median']:.2f}" if off and "median" in off else "-"
        lines.append(f"| {what} | {'-' if got is None else f'{got:.2f}'} | <= {target} | {met} | {off_ms} |")
    worst = max((p99r(ours, k) or 0 for k in ours if k[0].startswith("tick")), default=None)
    if worst:
        lines.append(f"| p99 / median of consecutive ticks (worst row) | {worst:.2f} | <= 1.2 | "
                     f"{'yes' if worst <= 1.2 else 'no'} | |")
    pairs = [(B, med(ours, ("tick q4", B)), med(ours, ("tick bf16", B))) for B in sorted({k[1] for k in ours})]
    pairs = [(B, q, b) for B, q, b in pairs if q is not None and b is not None]
    if pairs:
        slower = [str(B) for B, q, b in pairs if q >= b]
        lines.append(f"| q4 faster than bf16 at every batch size | not at {', '.join(slower)} | | no | |" if slower
                     else "| q4 faster than bf16 at every batch size | at all | | yes | |")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ours", action="append", default=[])
    for name in ("ours-structure", "official", "official-structure"):
        p.add_argument(f"--{name}")
    p.add_argument("--plot", metavar="PNG", help="also draw the whole tick against sessions into this file")
    a = p.parse_args(argv)
    ours, ours_s = load(a.ours, []), load(a.ours_structure, [])
    official, official_s = load(a.official, {}), load(a.official_structure, {})
    o, os_ = ours_rows(ours), ours_rows(ours_s)
    f, fs = official_rows(official), official_rows(official_s)
    out = [f"Ours: {ours['meta'].get('versions', '?')}. Official loop: moshi {official['meta'].get('moshi', '?')}, "
           f"torch {official['meta'].get('torch', '?')}, {official['meta'].get('device', '?')}, "
           f"{official['meta'].get('date', '?')}.", ""]
    out += tick_table(o, f, "Whole tick, official 7B config, every session at a full window") + [""]
    if os_ or fs:
        out += tick_table(os_, fs, "Structure only (the 7B's layers and the full Mimi, negligible widths)") + [""]
    per_op = [r for (w, B), r in o.items() if w.startswith("per-op")]
    for (w, B), r in o.items():
        if w.startswith("per-op"):
            out.append(f"Op-by-op engine (program=False), {w.split()[-1]}, B={B}: {cell(r)} ms.")
    codec = sorted((B, r) for (w, B), r in o.items() if w == "codec")
    if codec:
        out.append("Mimi alone (encode + decode of one frame, tick.CodecRunner): " +
                   ", ".join(f"B={B} {cell(r)} ms" for B, r in codec) + ".")
    real_time = [f"{w.removeprefix('tick ')} {real_time_sessions(o, w)}" for w in
                 sorted({w for (w, B) in o if w.startswith("tick") and "(" not in w})]
    if real_time:
        out.append("Real-time sessions (the largest measured batch whose p99 tick is under 80 ms): " +
                   ", ".join(real_time) + ".")
    if per_op or codec or real_time:
        out.append("")
    out += ["### Targets", ""] + targets(o, os_, f, fs)
    print("\n".join(out))
    if a.plot:
        plot(o, f, ours["meta"], a.plot)


if __name__ == "__main__":
    main()
