"""`serve --replicas 2` (Ray Serve, tiny model, CPU): one scenario, as an operator sees it.

Two replicas of 2 slots each. Four conversations started at the same instant all get a
session, two on each replica. A client that never reads is cut off by Serve's proxy
within 10 s, as `serve` cuts it off, while the conversations next to it keep real time.
Conversations opened one after another spread over both replicas, each at real-time
frame rate; a fifth is told the cluster is full in the words of a full `serve`; Ray's
metrics endpoint shows sessions, tick quantiles and dropped frames per replica. Then one
replica's process is killed: exactly its conversations end, the other's keeps its frame
rate through the kill, and a new conversation is still admitted. Finally SIGTERM stops
everything: exit status 0 and no process of the cluster left. Real-time bounds as in
test_server_attacks.py (>= 12 frames/s, no gap over 0.3 s).
"""

import asyncio
import base64
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter

import aiohttp
import numpy as np
import pytest

from personaplex_fast.tiny import make_tiny

# Not imported here: this process's peak memory is inherited by the subprocesses of
# other tests that measure theirs (test_cli_refusals).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                reason="the distributed mode needs pip install '.[cluster]'")

START, AUDIO, TEXT, ERROR = 0, 1, 2, 3
FRAME = 1920
SLOTS = 2
MIN_RATE, MAX_GAP_S = 12.0, 0.3
FULL = f"the server is full ({SLOTS} sessions); try again later"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_pids(marker: str) -> list[int]:
    """Processes whose environment holds `marker` (every process of the cluster inherits it)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if marker.encode() in open(f"/proc/{d}/environ", "rb").read():
                    pids.append(int(d))
            except OSError:
                pass
    return pids


def assert_gone(marker: str) -> None:
    deadline = time.monotonic() + 10
    while cluster_pids(marker):
        assert time.monotonic() < deadline, f"left running: {cluster_pids(marker)}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    model = make_tiny(tmp_path_factory.mktemp("tiny"))
    # Ray's socket paths live under its temp folder and must fit in 107 bytes: a short one.
    ray_tmp = tempfile.mkdtemp(prefix="ppx", dir="/tmp")
    port, metrics_port = free_port(), free_port()
    log = open(tmp_path_factory.mktemp("log") / "serve.err", "w+")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(model), "--replicas", "2",
         "--max-sessions", str(SLOTS), "--port", str(port), "--metrics-port", str(metrics_port), "--seed", "1"],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://"), (line, open(log.name).read())
        yield dict(base=line.split()[1].rstrip("/"), metrics=f"http://127.0.0.1:{metrics_port}/metrics",
                   proc=proc, log=log, marker=f"RAY_TMPDIR={ray_tmp}")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        log.seek(0)
        print(log.read())
        for pid in cluster_pids(f"RAY_TMPDIR={ray_tmp}"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


class Talk:
    """One conversation: START, then a frame every 80 ms (after `burst` frames at once)
    while model frames are logged as they arrive, until it is closed or ends."""

    def __init__(self, base: str):
        self.url = base.replace("http", "ws") + "/ws"
        self.arrivals: list[float] = []
        self.ended: float | None = None
        self.error: str | None = None
        self.tasks: list[asyncio.Task] = []

    async def open(self, http: aiohttp.ClientSession, burst: int = 0, first: bytes | None = None) -> str | None:
        """-> None once READY, else the ERROR line."""
        self.ws = await http.ws_connect(self.url)
        self.replica = self.ws._response.headers.get("X-Replica")  # aiohttp keeps the handshake's headers there
        await self.ws.send_bytes(first or bytes([START]) + json.dumps({"voice": "", "prompt": ""}).encode())
        msg = await self.ws.receive(timeout=15)
        if msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == ERROR:
            return json.loads(msg.data[1:])["error"]
        assert msg.type == aiohttp.WSMsgType.BINARY and msg.data[0] == START, msg
        self.tasks = [asyncio.create_task(self._send(burst)), asyncio.create_task(self._receive())]
        return None

    async def _send(self, burst: int) -> None:
        t = np.arange(FRAME) / 24000
        frame = bytes([AUDIO]) + (0.2 * np.sin(2 * np.pi * 220 * t)).astype("<f4").tobytes()
        t0 = time.monotonic()
        try:
            for i in range(10**6):
                await self.ws.send_bytes(frame)
                if i >= burst:
                    await asyncio.sleep(max(0.0, t0 + (i - burst + 1) * 0.08 - time.monotonic()))
        except (ConnectionError, RuntimeError):
            pass

    async def _receive(self) -> None:
        try:
            while True:
                msg = await self.ws.receive()
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                if msg.data[0] == AUDIO:
                    self.arrivals.append(time.monotonic())
                elif msg.data[0] == ERROR:
                    self.error = json.loads(msg.data[1:])["error"]
        finally:
            self.ended = time.monotonic()

    def rate_and_gap(self, t0: float, t1: float) -> tuple[float, float]:
        times = np.array(self.arrivals)
        inside = times[(times >= t0) & (times <= t1)]
        rate = (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 1 else 0.0
        gaps = np.diff(np.concatenate([times[times < t0][-1:], inside, [t1]]))
        return rate, gaps.max()

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await self.ws.close()


def assert_real_time(talks, t0: float, t1: float, what: str) -> None:
    for i, talk in enumerate(talks):
        rate, gap = talk.rate_and_gap(t0, t1)
        print(f"{what}: conversation {i} on {talk.replica}: {rate:.1f} frames/s, longest gap {gap:.2f} s")
        assert rate >= MIN_RATE and gap <= MAX_GAP_S, (
            f"{what}: conversation {i} on {talk.replica}: {rate:.1f} frames/s, longest gap {gap:.2f} s")


def metrics(url: str) -> dict[tuple[str, str, str], float]:
    """{(name, replica, quantile): value} of our metrics on Ray's Prometheus endpoint."""
    out = {}
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        if line.startswith("ray_personaplex_"):
            name, rest = line.split("{", 1)
            labels = dict(kv.split("=", 1) for kv in rest.rsplit("}", 1)[0].split(",") if "=" in kv)
            key = (name[len("ray_"):], labels.get("replica", "").strip('"'), labels.get("quantile", "").strip('"'))
            out[key] = float(line.rsplit(" ", 1)[1])
    return out


async def replica_pids(http, base: str) -> dict[str, int]:
    """replica id -> pid, from /api/info (answered by whichever replica Serve picks)."""
    pids = {}
    for _ in range(60):
        async with http.get(base + "/api/info") as r:
            replica = (await r.json())["replica"]
        pids[replica["id"]] = replica["pid"]
        if len(pids) == 2:
            return pids
    raise AssertionError(f"/api/info answered from {pids} only")


async def same_protocol(http, base: str) -> None:
    """What `serve` says to a bad client, said through Serve's proxy."""
    bad = Talk(base)
    assert await bad.open(http, first=b"hello") == "the first message must be START (0x00 + JSON)"
    huge = Talk(base)
    assert await huge.open(http, first=bytes([START]) + bytes(200_000)) == "message larger than 65536 bytes"
    for talk in (bad, huge):
        await talk.close()
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await http.ws_connect(base.replace("http", "ws") + "/ws", headers={"Origin": "http://evil.example"})
    assert refused.value.status == 403


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def proxy_pid(marker: str) -> int:
    """Serve's HTTP proxy of this (one-node) cluster."""
    for pid in cluster_pids(marker):
        try:
            if open(f"/proc/{pid}/cmdline", "rb").read().startswith(b"ray::ProxyActor"):
                return pid
        except OSError:
            pass
    raise AssertionError("no ProxyActor process")


async def wait_idle(http, base: str, pids: dict[str, int], within: float) -> None:
    """Until /api/info has answered from every replica with no session."""
    deadline, sessions = time.monotonic() + within, {}
    while not (set(sessions) == set(pids) and not any(sessions.values())):
        assert time.monotonic() < deadline, f"sessions still open after {within} s: {sessions}"
        async with http.get(base + "/api/info") as r:
            info = await r.json()
        sessions[info["replica"]["id"]] = info["sessions"]
        await asyncio.sleep(0.05)


def masked(payload: bytes) -> bytes:
    """One binary websocket frame from a client (masked)."""
    mask, n = os.urandom(4), len(payload)
    head = struct.pack("!BB", 0x82, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x82, 0x80 | 126, n)
    data = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
    return head + mask + data.tobytes()


def non_reader(base: str, seconds: float) -> tuple[str, float | None]:
    """A conversation that sends a frame every 80 ms and never reads (4 KB receive buffer).
    -> (its replica, seconds until the server cut it off, or None if it never did)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.settimeout(5.0)
        s.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(1)  # the handshake only: what follows is never read
        assert b" 101 " in head.split(b"\r\n")[0], head
        replica = next(line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                       if line.lower().startswith(b"x-replica:"))
        s.sendall(masked(bytes([START]) + json.dumps({"voice": "", "prompt": ""}).encode()))
        frame = masked(bytes([AUDIO]) + bytes(4 * FRAME))
        t0 = time.monotonic()
        try:
            for i in range(int(seconds / 0.08)):
                s.sendall(frame)
                time.sleep(max(0.0, t0 + (i + 1) * 0.08 - time.monotonic()))
        except OSError:  # reset by the proxy (a send timeout would also land here, past the bound)
            return replica, time.monotonic() - t0
        return replica, None


def test_a_burst_of_conversations_gets_every_slot(cluster):
    """2 x SLOTS conversations started at the same instant, five times: all get a session,
    SLOTS on each replica (Serve's own counts lag behind such a burst)."""
    base = cluster["base"]

    async def scenario():
        async with aiohttp.ClientSession() as http:
            pids = await replica_pids(http, base)
            for burst in range(5):
                talks = [Talk(base) for _ in range(2 * SLOTS)]
                got = await asyncio.gather(*(t.open(http) for t in talks))
                for t in talks:
                    await t.close()
                assert got == [None] * len(talks) and sorted(Counter(t.replica for t in talks).values()) == [
                    SLOTS, SLOTS], f"burst {burst}: {got}, {[t.replica for t in talks]}"
                await wait_idle(http, base, pids, within=5.0)

    asyncio.run(scenario())


def test_a_client_that_stops_reading_is_dropped(cluster):
    """A conversation that keeps sending but never reads, on a replica with a normal one:
    Serve's proxy drops it within 10 s (its output queue fills, as in `serve`), the
    replica frees its slot, both normal conversations keep real time throughout, and
    neither the replica nor the proxy grows."""
    base, marker = cluster["base"], cluster["marker"]

    async def scenario():
        async with aiohttp.ClientSession() as http:
            pids = await replica_pids(http, base)
            normal = [Talk(base), Talk(base)]
            for talk in normal:
                assert await talk.open(http) is None
            assert {t.replica for t in normal} == set(pids)  # one on each: the non-reader joins one
            proxy = proxy_pid(marker)
            before = {pid: rss_mb(pid) for pid in [proxy, *pids.values()]}
            t0 = time.monotonic()
            replica, cut = await asyncio.to_thread(non_reader, base, 20.0)
            t1 = time.monotonic()
            grown = {pid: rss_mb(pid) - mb for pid, mb in before.items()}
            print(f"the non-reader on {replica}: cut off after {cut} s; grown by {grown} MB")
            assert cut is not None and cut < 10.0, f"the non-reader on {replica} was cut off after {cut} s"
            assert_real_time(normal, t0, t1, "next to a client that stopped reading")
            assert max(grown.values()) < 16, grown
            for talk in normal:
                await talk.close()
            await wait_idle(http, base, pids, within=5.0)  # the non-reader's slot too (idle timeout: 30 s)

    asyncio.run(scenario())


def test_two_replicas_spread_survive_a_kill_and_stop(cluster):
    base = cluster["base"]

    async def scenario():
        async with aiohttp.ClientSession() as http:
            pids = await replica_pids(http, base)
            await same_protocol(http, base)

            # More conversations than one replica has slots, one after another: 2 and 2.
            talks = []
            for i in range(2 * SLOTS):
                talk = Talk(base)
                assert await talk.open(http, burst=12 if i == 0 else 0) is None, f"conversation {i} refused"
                talks.append(talk)
            assert set(Counter(t.replica for t in talks).values()) == {SLOTS} and set(pids) == {
                t.replica for t in talks}, [t.replica for t in talks]
            extra = Talk(base)
            assert await extra.open(http) == FULL
            await extra.close()
            t0 = time.monotonic()
            await asyncio.sleep(4.0)
            assert_real_time(talks, t0, time.monotonic(), "all four")

            # Ray's metrics: sessions, tick quantiles and dropped frames of each replica.
            deadline = time.monotonic() + 30
            while True:
                m = metrics(cluster["metrics"])
                want = [("personaplex_sessions", r, "") for r in pids] + [
                    ("personaplex_tick_ms", r, q) for r in pids for q in ("p50", "p99")]
                if all(k in m for k in want) and [m[k] for k in want[:2]] == [SLOTS, SLOTS] and m.get(
                        ("personaplex_dropped_frames_total", talks[0].replica, ""), 0) > 0:
                    break
                assert time.monotonic() < deadline, sorted(m.items())
                await asyncio.sleep(1.0)
            for r in pids:
                assert 0 < m[("personaplex_tick_ms", r, "p50")] <= m[("personaplex_tick_ms", r, "p99")] < 80
                assert m[("personaplex_slots", r, "")] == SLOTS

            # One conversation leaves; then the replica of talks[0] is killed.
            victim = talks[0].replica
            mine = [t for t in talks if t.replica == victim]
            other = [t for t in talks if t.replica != victim]
            await other[1].close()
            await asyncio.sleep(0.5)
            kill = time.monotonic()
            os.kill(pids[victim], signal.SIGKILL)
            newcomer = Talk(base)
            assert await newcomer.open(http) is None, "no new conversation after the kill"
            await asyncio.sleep(4.0)
            assert all(t.ended is not None and t.ended - kill < 3.0 for t in mine), [t.ended for t in mine]
            assert other[0].ended is None and newcomer.ended is None
            assert_real_time(other[:1], kill - 1.0, time.monotonic(), "the other replica's, through the kill")
            assert_real_time([newcomer], time.monotonic() - 2.0, time.monotonic(), "admitted after the kill")
            for talk in talks + [newcomer]:
                await talk.close()

    asyncio.run(scenario())

    proc = cluster["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0
    assert_gone(cluster["marker"])
    # Ours (the driver's lines and the replicas') only: Ray 2.60's proxy logs a traceback of
    # its own ("async generator ignored GeneratorExit") when a client closes a websocket
    # while messages for it are still on their way.
    cluster["log"].seek(0)
    ours = [line for line in cluster["log"].read().splitlines() if "(ProxyActor pid=" not in line]
    assert not [line for line in ours if "Traceback" in line], "\n".join(ours)


def test_the_proxies_bound_a_client_as_serve_does():
    """cluster_routing's copies of server.py's bounds (the proxies import no MLX to read them)."""
    code = ("from personaplex_fast import cluster_routing as c, server as s; "
            "print(c.OUTPUT_MESSAGES == s.OUTPUT_MESSAGES and c.SEND_BUFFER == s.SEND_BUFFER)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "True", proc.stderr


@pytest.mark.parametrize("extra, error", [
    (["--replicas", "0", "--port", "8998"], "--replicas 0: needs at least 1"),
    (["--replicas", "2", "--port", "0"], "--port 0 with --replicas: Ray Serve's proxies need a fixed port"),
    (["--replicas", "2", "--port", "8998", "--model", "/nonexistent/model"], "/nonexistent/model: no such file"),
])
def test_refused_before_ray_starts(tmp_path, extra, error):
    model = ["--model", str(tmp_path)] if "--model" not in extra else []
    proc = subprocess.run([sys.executable, "-m", "personaplex_fast.cli", "serve", *model, *extra],
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"personaplex-fast: error: {error}"), \
        proc.stderr


def test_without_ray_the_distributed_mode_names_the_extra(tmp_path):
    """As on a plain install: `import ray` fails, and the one line says what to install."""
    code = ("import sys; sys.modules['ray'] = None; from personaplex_fast.cli import main; "
            f"sys.exit(main(['serve', '--model', {str(tmp_path)!r}, '--replicas', '2']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == ("personaplex-fast: error: --replicas needs Ray Serve (ray is missing): "
                                   "pip install 'personaplex-fast[cluster]'"), proc.stderr


def test_a_replica_that_cannot_start_is_told_in_one_line(tmp_path):
    """The replicas' own refusal (here warm_engine's: KV caches past the memory) ends the
    command with status 2 and that line, and takes the local cluster down with it."""
    model = make_tiny(tmp_path / "tiny")
    ray_tmp = tempfile.mkdtemp(prefix="ppx", dir="/tmp")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(model), "--replicas", "1",
             "--max-sessions", "100000000", "--port", str(free_port())],
            capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_TMPDIR": ray_tmp})
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and last.startswith(
            "personaplex-fast: error: the replicas did not start: --max-sessions 100000000: their KV caches need"), \
            proc.stderr[-3000:]
        assert_gone(f"RAY_TMPDIR={ray_tmp}")
    finally:
        for pid in cluster_pids(f"RAY_TMPDIR={ray_tmp}"):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
