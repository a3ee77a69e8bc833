"""How long a tick's thread waits for the GIL while other threads run Python, at several
interpreter switch intervals (why server.py lowers it to SWITCH_INTERVAL_S).

A stand-in for `serve`'s worker thread: each "tick" sleeps as the GPU work does (GIL
released), then takes the GIL back --handoffs times (an evaluation returning, numpy
copies, the executor's hand-offs); --busy threads meanwhile run pure Python without pause
(event loops saturated with websocket messages; a Ray Serve replica has two). Prints the
tick's median and p95 against what it slept.

    python bench/switch_interval.py --busy 1,2 --intervals 5,1,0.5
"""

import argparse
import statistics
import sys
import threading
import time


def ticks(interval_s: float, busy: int, n: int, sleep_s: float, handoffs: int) -> list[float]:
    sys.setswitchinterval(interval_s)
    stop = threading.Event()

    def spin():
        x = 0
        while not stop.is_set():
            for _ in range(1000):
                x += 1

    threads = [threading.Thread(target=spin) for _ in range(busy)]
    for t in threads:
        t.start()
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            time.sleep(sleep_s)
            for _ in range(handoffs):
                time.sleep(0)
            out.append((time.perf_counter() - t0) * 1e3)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return sorted(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--busy", default="1,2", help="busy threads, each count timed")
    p.add_argument("--intervals", default="5,1,0.5", help="switch intervals, ms")
    p.add_argument("--ticks", type=int, default=40)
    p.add_argument("--sleep-ms", type=float, default=59.0, help="the GPU's part of a tick")
    p.add_argument("--handoffs", type=int, default=5)
    a = p.parse_args()
    print("| busy threads | switch interval (ms) | tick median (ms) | p95 | asleep |\n|---|---|---|---|---|")
    for busy in (int(x) for x in a.busy.split(",")):
        for ms in (float(x) for x in a.intervals.split(",")):
            t = ticks(ms / 1e3, busy, a.ticks, a.sleep_ms / 1e3, a.handoffs)
            print(f"| {busy} | {ms:g} | {statistics.median(t):.1f} | {t[int(0.95 * len(t))]:.1f} | {a.sleep_ms:g} |",
                  flush=True)


if __name__ == "__main__":
    main()
