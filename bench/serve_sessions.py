"""Real-time sessions held by `serve` and by `serve --replicas 1` (Ray Serve) on one machine.

For each mode the server is started with --max-sessions S; then, for each count N of
--counts, N conversations are opened (50 ms apart within each client process, the
client processes side by side), each streams a frame every 80 ms, and a session is
held when, over the last --seconds, its model frames came at >= 12 frames/s with no gap
over 0.3 s (the bounds of tests/test_server_attacks.py). A mode's answer is the largest
N at which every session was held. One table, and --json with every session's figures.

    python bench/serve_sessions.py --model nvidia/personaplex-7b-v1 --max-sessions 72 \\
        --counts 48,56,64,72 --seconds 20 --json sessions.json
    python bench/serve_sessions.py --random 7b --counts 48,64,72 --seconds 10    # no download
    python bench/serve_sessions.py --tiny --counts 1,2 --seconds 2     # CPU, a tiny model

--random 7b: where the weights cannot be downloaded (a GPU machine off the network),
random ones of the official 7B's shape (bf16, tiny.make_random: ~15 GB written in the
temporary work dir under /tmp, drawn on the device, removed at the end); --random
structure: the 7B's layers at negligible widths (gpu_common.structure_config), quick on
a CPU. Their conversations have no voice prompt (make_random writes no voices.tgz).
Clients: --per-client sessions per client process (default 16), so the client side is not
what falls behind. The distributed mode needs `pip install '.[cluster]'`. The JSON is
rewritten after every count, so a run cut short keeps what it measured.
"""

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

FRAME = 1920
MIN_RATE, MAX_GAP_S = 12.0, 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one client process: n conversations


async def _converse(http, url: str, until: float, measure_from: float) -> dict:
    import aiohttp

    frame = bytes([1]) + (0.2 * np.sin(2 * np.pi * 220 * np.arange(FRAME) / 24000)).astype("<f4").tobytes()
    arrivals = []
    async with http.ws_connect(url) as ws:
        await ws.send_bytes(b'\x00{"voice": "", "prompt": ""}')
        first = await ws.receive(timeout=60)
        if first.type != aiohttp.WSMsgType.BINARY or first.data[0] != 0:
            return {"error": first.data[1:].decode() if first.type == aiohttp.WSMsgType.BINARY else str(first.type)}

        async def send():
            t0 = time.monotonic()
            for i in range(10**7):
                await ws.send_bytes(frame)
                await asyncio.sleep(max(0.0, t0 + (i + 1) * 0.08 - time.monotonic()))

        sender = asyncio.create_task(send())
        try:
            while time.monotonic() < until:
                msg = await ws.receive(timeout=max(0.1, until - time.monotonic() + 5))
                if msg.type != aiohttp.WSMsgType.BINARY:
                    return {"error": f"closed ({msg.type.name})"}
                if msg.data[0] == 1:
                    arrivals.append(time.monotonic())
                elif msg.data[0] == 3:
                    return {"error": msg.data[1:].decode()}
        finally:
            sender.cancel()
    times = np.array(arrivals)
    inside = times[times >= measure_from]
    if len(inside) < 2:
        return {"error": "no frames in the measured window"}
    gaps = np.diff(np.concatenate([times[times < measure_from][-1:], inside, [until]]))
    return {"rate": float((len(inside) - 1) / (inside[-1] - inside[0])), "gap": float(gaps.max())}


def _client(url: str, n: int, until: float, seconds: float, out) -> None:
    import aiohttp

    async def run():
        async with aiohttp.ClientSession() as http:
            opened = []
            for _ in range(n):
                opened.append(asyncio.create_task(_converse(http, url, until, until - seconds)))
                await asyncio.sleep(0.05)
            return await asyncio.gather(*opened, return_exceptions=True)

    results = asyncio.run(run())
    out.put([r if isinstance(r, dict) else {"error": repr(r)} for r in results])


def hold(base: str, count: int, seconds: float, per_client: int, warmup: float) -> list[dict]:
    """Open `count` conversations, stream, and return each one's rate and longest gap."""
    clients = math.ceil(count / per_client)
    sizes = [count // clients + (i < count % clients) for i in range(clients)]
    # Opening takes time (prompts, prefill slices): measure only once all are streaming.
    until = time.monotonic() + warmup + count * 0.05 + seconds
    out = mp.get_context("spawn").Queue()
    procs = [mp.get_context("spawn").Process(target=_client, args=(base.replace("http", "ws") + "/ws", k,
                                                                     until, seconds, out)) for k in sizes]
    for p in procs:
        p.daemon = True
        p.start()
    results = [r for _ in procs for r in out.get(timeout=until - time.monotonic() + 120)]
    for p in procs:
        p.join(30)
    return results


# -- the servers


def write_model(kind: str, directory: str) -> None:
    """The checkpoint of --tiny or --random, made in a process of its own (spawned: this
    one never holds device memory, which the servers size their slots from)."""
    if kind == "tiny":
        from personaplex_fast.tiny import make_tiny

        make_tiny(directory)
    else:
        from personaplex_fast.config import LMConfig
        from personaplex_fast.tiny import make_random

        from gpu_common import structure_config

        cfg = structure_config() if kind == "structure" else LMConfig()
        need, free = 2 * cfg.parameter_count() + (1 << 30), shutil.disk_usage(os.path.dirname(directory)).free
        if need > free:
            raise SystemExit(f"{directory}: the random {kind} checkpoint needs {need / 1e9:.1f} GB, "
                             f"{free / 1e9:.1f} GB is free there")
        make_random(directory, cfg)


def make_model(kind: str, directory: str) -> float:
    t0 = time.monotonic()
    proc = mp.get_context("spawn").Process(target=write_model, args=(kind, directory), daemon=True)
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"writing the {kind} checkpoint failed (exit status {proc.exitcode})")
    took = time.monotonic() - t0
    size = sum(f.stat().st_size for f in os.scandir(directory)) / 1e9
    print(f"{kind} checkpoint: {size:.1f} GB written in {took:.1f} s", flush=True)
    return took


def start_server(args, mode: str, ray_tmp: str, logs: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(args.model),
           "--max-sessions", str(args.max_sessions), "--port", str(free_port()), "--max-connections",
           str(4 * args.max_sessions + 16), "--max-handshakes", str(2 * args.max_sessions + 16)]
    if args.kv_bits:
        cmd += ["--kv-bits", str(args.kv_bits)]
    if mode == "replicas":
        cmd += ["--replicas", "1"]
    log = os.path.join(logs, f"{mode}.err")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"),
                            text=True, env={**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
    except BaseException:  # a timeout's SIGTERM while it starts
        proc.kill()
        raise
    if not line.startswith("serving "):
        proc.kill()
        raise SystemExit(f"{mode}: the server did not start; its log: {log}")
    return proc, line.split()[1].rstrip("/")


def measure(args, mode: str, counts: list[int], work: str, logs: str, save) -> dict:
    """One mode: its server started, each count held in turn; the mode's report, saved
    (save(report)) after every count."""
    t0 = time.monotonic()
    proc, base = start_server(args, mode, work, logs)
    report = {"start_s": round(time.monotonic() - t0, 1), "held_all_up_to": 0, "rows": []}
    print(f"{mode}: serving after {report['start_s']} s", flush=True)
    rows = report["rows"]
    try:
        for n in counts:
            results = hold(base, n, args.seconds, args.per_client, args.warmup)
            held = sum(1 for r in results if "rate" in r and r["rate"] >= MIN_RATE and r["gap"] <= MAX_GAP_S)
            rates = [r["rate"] for r in results if "rate" in r]
            rows.append({"sessions": n, "held": held, "results": results,
                         "min_rate": min(rates, default=0.0),
                         "max_gap": max((r["gap"] for r in results if "gap" in r), default=math.inf)})
            report["held_all_up_to"] = max((r["sessions"] for r in rows if r["held"] == r["sessions"]), default=0)
            save(report)
            print(f"{mode}: {n} sessions, {held} held real time (min {rows[-1]['min_rate']:.1f} frames/s, "
                  f"longest gap {rows[-1]['max_gap']:.2f} s)", flush=True)
            time.sleep(2.0)  # every session has left before the next count
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model source (default with --tiny: a tiny checkpoint made here)")
    p.add_argument("--tiny", action="store_true", help="a tiny random checkpoint, on the CPU")
    p.add_argument("--random", choices=("7b", "structure"), default=None,
                   help="random weights of the official 7B's shape (bf16), or its structure at negligible widths")
    p.add_argument("--kv-bits", type=int, choices=(8,), default=None, help="serve --kv-bits")
    p.add_argument("--modes", default="serve,replicas", help="serve (plain), replicas (Ray Serve, one replica)")
    p.add_argument("--max-sessions", type=int, default=None, help="engine slots (default: the largest count)")
    p.add_argument("--counts", default="16,32,48,64", help="session counts to try, in order")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per count")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds streamed before measuring")
    p.add_argument("--per-client", type=int, default=16, help="sessions per client process")
    p.add_argument("--json", default=None)
    p.add_argument("--logs", default=None, help="keep the servers' logs in this folder (default: only when one "
                                                "did not start)")
    args = p.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    args.max_sessions = args.max_sessions or max(counts)
    # A `timeout` ends the run through the finally clauses: the servers stopped, the model removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = tempfile.mkdtemp(prefix="ppxb", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    logs = args.logs or work
    os.makedirs(logs, exist_ok=True)
    kind = args.random or ("tiny" if args.tiny and not args.model else None)
    made = os.path.join(work, "model") if kind else None
    done = False
    report = {"max_sessions": args.max_sessions, "seconds": args.seconds, "kv_bits": args.kv_bits, "modes": {}}

    def save(mode_report=None, mode=None):
        if mode is not None:
            report["modes"][mode] = mode_report
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)

    try:
        if made:
            report["write_s"] = round(make_model(kind, made), 1)
            args.model = made
        report["model"] = f"random {kind}" if args.random else str(args.model)
        for mode in args.modes.split(","):
            save(measure(args, mode, counts, work, logs, lambda r, m=mode: save(r, m)), mode)
        print("\n| mode | sessions held in real time (all of them) |\n|---|---|")
        for mode, r in report["modes"].items():
            print(f"| {mode} | {r['held_all_up_to']} |")
        done = True
    finally:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if done or args.logs:  # else the servers' logs stay in the work dir
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
