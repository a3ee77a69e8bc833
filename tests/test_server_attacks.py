"""Attacks on a live `serve` (tiny checkpoint, 127.0.0.1) while a normal session talks.

A probe process holds one ordinary session for the whole file, streaming audio in real
time and logging when each model frame arrives. Each attack runs in a window of at
least WINDOW_S seconds, with bounded loops; after it the server must be up, and in the
window the probe must have had >= 12 frames/s and no gap over 0.3 s. Every refusal must
be one line. At the end the server's memory must be back within MEMORY_BOUND_MB of what
it was after a first round of normal sessions, and nothing may have been written but
the voice cache (the server runs in an empty folder with its own HOME).

The server has 3 slots (the probe takes one), 2 s handshake and 3 s idle timeouts,
at most 24 sockets of which 12 not in a session, and prompts of at most 240 tokens.
"""

import asyncio
import base64
import json
import os
import struct
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

import aiohttp
import numpy as np
import pytest

from personaplex_fast import torchfile
from personaplex_fast.tiny import TINY, make_tiny
from personaplex_fast.tokenizer import load_tokenizer, prompt_tokens
from personaplex_fast.voices import VOICE_NAMES

START, AUDIO, TEXT, ERROR = 0, 1, 2, 3
FRAME = 1920
WINDOW_S = 4.0
MIN_RATE, MAX_GAP_S = 12.0, 0.3
MEMORY_BOUND_MB = 40
MAX_TOKENS = 240

PROBE = r"""
import asyncio, sys, time, aiohttp, numpy as np
url, log = sys.argv[1], open(sys.argv[2], "w", buffering=1)
async def main():
    t = np.arange(1920) / 24000
    frame = bytes([1]) + (0.2 * np.sin(2 * np.pi * 220 * t)).astype("<f4").tobytes()
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_bytes(b'\x00{"voice": "", "prompt": ""}')
        ready = await ws.receive(timeout=10)
        log.write(f"ready {ready.data[:1]!r}\n")
        async def send():
            t0 = time.monotonic()
            for i in range(10**6):
                await ws.send_bytes(frame)
                await asyncio.sleep(max(0, t0 + (i + 1) * 0.08 - time.monotonic()))
        sender = asyncio.create_task(send())
        while True:
            msg = await ws.receive(timeout=10)
            if msg.type != aiohttp.WSMsgType.BINARY:
                log.write(f"closed {msg.type}\n"); break
            if msg.data[0] == 1:
                log.write(f"{time.monotonic():.4f}\n")
            elif msg.data[0] == 3:
                log.write(f"error {msg.data[1:]!r}\n"); break
asyncio.run(main())
"""


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def hostile_voices(model_dir, tmp):
    """voices.tgz plus three voices that must be left out: an id past the audio table,
    a stride-0 tensor of 4 billion elements, and another model's width."""
    from test_voices import _save_crafted, _View

    folder = tmp / "voices"
    with tarfile.open(model_dir / "voices.tgz") as tar:
        tar.extractall(tmp, filter="data")
    rng = np.random.default_rng(0)
    ring = rng.integers(0, TINY.card, (1, TINY.n_q + 1, 4))
    ring[0, 3] = 5000
    torchfile.save(folder / "BADIDS.pt", {"embeddings": rng.standard_normal((5, 1, 1, TINY.dim)).astype(np.float32),
                                          "cache": ring})
    torchfile.save(folder / "WIDE.pt", {"embeddings": np.zeros((5, 1, 1, 64), np.float32),
                                        "cache": ring.clip(0, TINY.card)})
    _save_crafted(folder / "STRIDE0.pt", {"embeddings": _View((1 << 16, 1 << 16), (0, 0)), "cache": _View((4,), (1,))})
    with tarfile.open(model_dir / "voices.tgz", "w:gz") as tar:
        tar.add(folder, arcname="voices")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    model = make_tiny(root / "model")
    hostile_voices(model, tmp_path_factory.mktemp("voices"))
    dirs = {n: root / n for n in ("work", "home", "cache")}
    for d in dirs.values():
        d.mkdir()
    before = snapshot(model)
    # TMPDIR stays: MLX keeps its compiled CPU kernels there (a fresh one costs ~30 s of g++).
    env = {**os.environ, "HOME": str(dirs["home"]), "PERSONAPLEX_FAST_CACHE": str(dirs["cache"]),
           "PYTHONUNBUFFERED": "1"}
    log = open(root / "serve.err", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(model), "--port", "0",
         "--max-sessions", "3", "--seed", "1", "--handshake-timeout", "2", "--idle-timeout", "3",
         "--max-connections", "24", "--max-handshakes", "12", "--max-prompt-tokens", str(MAX_TOKENS)],
        cwd=dirs["work"], env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    probe = None
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving http://"), (line, open(log.name).read())
        base = line.split()[1].rstrip("/")
        arrivals = root / "probe.log"
        probe = subprocess.Popen([sys.executable, "-c", PROBE, base.replace("http", "ws") + "/ws", str(arrivals)])
        s = dict(base=base, proc=proc, log=log, arrivals=arrivals, model=model, before=before, dirs=dirs,
                 tokenizer=load_tokenizer(model / "tokenizer_spm_32k_3.model"))
        deadline = time.monotonic() + 20
        while len(probe_times(s)) < 10:
            assert time.monotonic() < deadline and probe.poll() is None, arrivals.read_text()
            time.sleep(0.1)
        yield s
    finally:
        if probe is not None:
            probe.kill()
        proc.terminate()
        rc = proc.wait(10)
        log.seek(0)
        print(log.read())
        assert rc == 0


def probe_times(s) -> np.ndarray:
    lines = s["arrivals"].read_text().splitlines() if s["arrivals"].exists() else []
    assert not [x for x in lines if x.startswith(("error", "closed"))], lines[-3:]
    return np.array([float(x) for x in lines if x[:1].isdigit()])


def prompt_of(s, tokens: int) -> str:
    """Role text whose wrapped prompt is exactly `tokens` tokens."""
    words, count = [], lambda w: len(prompt_tokens(s["tokenizer"], " ".join(w)))
    while count(words) < tokens:
        words.append(next(w for w in ("talk", "a", "b", "c") if count(words + [w]) <= tokens))
    assert count(words) == tokens
    return " ".join(words)


def start(voice="", prompt="") -> bytes:
    return bytes([START]) + json.dumps({"voice": voice, "prompt": prompt}).encode()


def one_line(text: str) -> str:
    assert text and "\n" not in text.strip() and len(text) < 300 and "Traceback" not in text, text
    return text


# ----------------------------------------------------------------- clients


async def session(s, first: bytes | str | None, frames: int = 0, headers=None, timeout=10.0,
                  tries: int = 20) -> str | None:
    """Open /ws (again after a 503, `tries` times), send `first`, stream `frames` frames
    after READY; -> the ERROR line, "ready" when a session ran, "closed", or "HTTP 503"."""
    url = s["base"].replace("http", "ws") + "/ws"
    async with aiohttp.ClientSession() as http:
        for attempt in range(tries):
            try:
                ws = await http.ws_connect(url, headers=headers)
                break
            except aiohttp.WSServerHandshakeError as e:
                if e.status != 503 or attempt == tries - 1:
                    return f"HTTP {e.status}"  # the gate's refusal (its one line: see raw_ws)
                await asyncio.sleep(0.25)  # "try again later": the previous attack's sockets closing
        async with ws:
            return await _converse(ws, first, frames, timeout)


async def _converse(ws, first, frames, timeout):
    if first is not None:
        await (ws.send_str(first) if isinstance(first, str) else ws.send_bytes(first))
    while True:
        msg = await ws.receive(timeout=timeout)
        if msg.type != aiohttp.WSMsgType.BINARY:
            return "closed"
        if msg.data[0] == ERROR:
            return one_line(json.loads(msg.data[1:])["error"])
        if msg.data[0] == START:
            for _ in range(frames):
                await ws.send_bytes(bytes([AUDIO]) + bytes(4 * FRAME))
                await asyncio.sleep(0.08)
            return "ready"


async def raw_ws(s, headers: str = "", first: bytes | None = None):
    """A websocket by hand: upgrade, optionally one masked binary frame. -> (reader, writer, status line)."""
    host, port = s["base"].removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
    status = (await asyncio.wait_for(reader.readline(), 10)).decode()
    if " 101 " in status:
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if first is not None:
            writer.write(frame_bytes(first))
    return reader, writer, status


def frame_bytes(payload: bytes, opcode: int = 2) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = struct.pack("!BB", 0x80 | opcode, 0x80 | n) if n < 126 else (
        struct.pack("!BBH", 0x80 | opcode, 0xFE, n) if n < 65536 else struct.pack("!BBQ", 0x80 | opcode, 0xFF, n))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def reset(writer) -> None:
    """Close with an RST, as a crashed client does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def http_get(s, path: str, headers=None) -> tuple[int, str]:
    req = urllib.request.Request(s["base"] + path, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


# ----------------------------------------------------------------- attacks


async def bad_voices(s):
    assert json.loads(http_get(s, "/api/info")[1])["voices"] == sorted(VOICE_NAMES)
    for name in ("BADIDS", "STRIDE0", "WIDE", "../voices/NATF0", "NATF0.pt", "x" * 3000):
        assert "unknown voice" in await session(s, start(voice=name))


async def prompts_over_the_limits(s):
    cases = [(start(prompt="\U0001F600" * 4000), "tokens; the limit is 240"),
             (start(prompt="x" * 4001), "the prompt has 4001 characters; the limit is 4000"),
             (start(voice="NATF0", prompt=prompt_of(s, 230)), "frames long"),
             (start(prompt=prompt_of(s, MAX_TOKENS + 1)), f"the prompt is {MAX_TOKENS + 1} tokens")]
    for _ in range(5):
        got = await asyncio.gather(*(session(s, m) for m, _ in cases))
        for line, (_, want) in zip(got, cases):
            assert want in line, line


async def start_then_reset(s):
    """5 clients a round START with the longest prompt and reset at once (the attack
    that gave a running session a 12 s gap when prefills ran before admission)."""
    first = start(prompt=prompt_of(s, 230))
    for _ in range(8):
        conns = await asyncio.gather(*(raw_ws(s, first=first) for _ in range(5)))
        await asyncio.sleep(0.02)
        for _, writer, _ in conns:
            reset(writer)
        await asyncio.sleep(0.2)


async def long_prompts_queue(s):
    """20 clients at once with 230-token prompts, two waves: two get the free slots
    (their prefills run in slices between ticks), the others are told to try again."""
    first = start(prompt=prompt_of(s, 230))
    for _ in range(2):
        got = await asyncio.gather(*(session(s, first, frames=5, tries=1) for _ in range(20)))
        assert got.count("ready") >= 1, got
        assert all(g in ("ready", "HTTP 503") or "try again later" in g for g in got), got


async def pending_flood(s):
    """200 sockets that each try to START (the issue's 800 pending STARTs, bounded):
    the gate and the slot reservation refuse what does not fit."""
    first = start()
    opened, refused = [], 0
    for _ in range(200):
        try:
            conn = await raw_ws(s, first=first)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            refused += 1
            continue
        if " 101 " not in conn[2]:
            assert " 503 " in conn[2], conn[2]
            head = await asyncio.wait_for(conn[0].read(1000), 5)
            assert "try again later" in one_line(head.decode().split("\r\n\r\n", 1)[1])
            refused += 1
        opened.append(conn)
    assert refused > 100
    await asyncio.sleep(0.5)
    for _, writer, _ in opened:
        writer.close()


async def malformed(s):
    deep = bytes([START]) + b"[" * 50_000
    cases = [(deep, "START payload is not a JSON object"),
             ("hello", "the first message must be START"),
             (bytes([START]) + b"\xff\xfe", "START payload is not a JSON object"),
             (start(voice={"a": 1}), "must be strings"),
             (bytes([START]) + b"[1, 2]", "START payload is not a JSON object"),
             (b"", "the first message must be START"),
             (bytes([AUDIO]) + bytes(4 * FRAME), "the first message must be START"),
             (bytes(200_000), "message larger than 65536 bytes")]
    for _ in range(3):
        got = await asyncio.gather(*(session(s, m) for m, _ in cases))
        for line, (_, want) in zip(got, cases):
            assert want in line, line
    reader, writer, status = await raw_ws(s)  # a text frame that is not UTF-8
    writer.write(frame_bytes(b"\xff\xfe", opcode=1))
    body = await asyncio.wait_for(reader.read(1000), 5)
    assert b"text message is not UTF-8" in body
    writer.close()


async def foreign_pages(s):
    port = s["base"].rsplit(":", 1)[1]
    for _ in range(10):
        _, w, status = await raw_ws(s, headers="Origin: http://evil.example\r\n")
        assert " 403 " in status
        w.close()
    code, body = http_get(s, "/api/info", {"Host": f"evil.example:{port}"})
    assert code == 403 and "is not served here" in one_line(body)
    assert await session(s, start(), headers={"Origin": f"http://127.0.0.1:{port}"}) == "ready"


async def socket_flood(s):
    """40 sockets that send nothing, then 10 that send a request line a byte at a time:
    past 12 not in a session the gate answers 503 at once; all are closed by the
    handshake timeout; the page loads again once they are gone."""
    host, port = s["base"].removeprefix("http://").split(":")
    idle = [await asyncio.open_connection(host, int(port)) for _ in range(40)]
    late = [await asyncio.open_connection(host, int(port)) for _ in range(5)]
    for r, w in late:
        w.write(f"GET /api/info HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    for r, w in late:
        head, body = (await asyncio.wait_for(r.read(1000), 5)).decode().split("\r\n\r\n", 1)
        assert " 503 " in head.splitlines()[0] and "try again later" in one_line(body)
        w.close()
    slow = [await asyncio.open_connection(host, int(port)) for _ in range(10)]
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.0:
        for _, w in slow:
            if not w.is_closing():
                w.write(b"G")
        await asyncio.sleep(0.3)
    for r, w in idle + slow:
        try:
            assert await asyncio.wait_for(r.read(1000), 1.5) in (b"", b"G")  # closed by the server
        except ConnectionError:
            pass
        w.close()
    assert http_get(s, "/api/info")[0] == 200


async def silent_clients(s):
    got = await asyncio.gather(session(s, None), session(s, start(), timeout=10))
    assert "no START message within 2 s" in got[0], got
    # READY, then no audio: the session is closed by the idle timeout.
    url = s["base"].replace("http", "ws") + "/ws"
    async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
        await ws.send_bytes(start())
        assert (await ws.receive(timeout=10)).data[0] == START
        while True:
            msg = await ws.receive(timeout=10)
            if msg.data[0] == ERROR:
                assert "no audio within 3 s" in one_line(json.loads(msg.data[1:])["error"])
                break


ATTACKS = [bad_voices, prompts_over_the_limits, start_then_reset, long_prompts_queue, pending_flood,
           malformed, foreign_pages, socket_flood, silent_clients]


@pytest.fixture(scope="module")
def baseline(served):
    """The server's memory after one round of normal sessions, prompted and not."""
    async def warm():
        return await asyncio.gather(session(served, start(voice="NATF0", prompt=prompt_of(served, 50)), frames=10),
                                    session(served, start(), frames=10))

    assert asyncio.run(warm()) == ["ready", "ready"]
    time.sleep(1.0)
    return rss_mb(served["proc"].pid)


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.__name__ for a in ATTACKS])
def test_attack_leaves_the_server_and_the_running_session_unharmed(served, baseline, attack):
    t0 = time.monotonic()
    asyncio.run(attack(served))
    time.sleep(max(0.0, t0 + WINDOW_S - time.monotonic()))
    t1 = time.monotonic()
    assert served["proc"].poll() is None
    assert http_get(served, "/api/info")[0] == 200
    times = probe_times(served)
    inside = times[(times >= t0) & (times <= t1)]
    # Frames per second over the arrivals in the window (its edges would add +-1 frame);
    # a stall at either edge shows as a gap.
    rate = (len(inside) - 1) / (inside[-1] - inside[0])
    gaps = np.diff(np.concatenate([times[times < t0][-1:], inside, [t1]]))
    assert rate >= MIN_RATE and gaps.max() <= MAX_GAP_S, (
        f"{attack.__name__}: {rate:.1f} frames/s, longest gap {gaps.max():.2f} s")


def test_memory_is_back_and_nothing_was_written_outside_the_cache(served, baseline):
    deadline = time.monotonic() + 10
    while json.loads(http_get(served, "/api/info")[1])["sessions"] != 1:  # the probe's
        assert time.monotonic() < deadline
        time.sleep(0.2)
    grown = rss_mb(served["proc"].pid) - baseline
    assert grown < MEMORY_BOUND_MB, f"the server grew by {grown:.0f} MB"
    d = served["dirs"]
    assert [p for n in ("work", "home") for p in d[n].rglob("*")] == []
    assert snapshot(served["model"]) == served["before"]
    (folder,) = (d["cache"] / "voices").iterdir()  # voices.tgz unpacked once, no temporary left
    voices = VOICE_NAMES
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".complete", "BADIDS.pt", "STRIDE0.pt", "WIDE.pt"] + [f"{v}.{x}" for v in voices
                                                            for x in ("pt", "wav", "safetensors")])
    served["log"].seek(0)
    text = served["log"].read()
    assert "Traceback" not in text
    for name in ("BADIDS", "WIDE", "STRIDE0"):
        assert f"voice {name} left out:" in text


# ----------------------------------------------------------------- TLS and token


@pytest.fixture(scope="module")
def tls_served(served, tmp_path_factory):
    """The same model served over TLS (a self-signed certificate for 127.0.0.1) with a token."""
    import shutil

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem"), "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(served["model"]), "--port", "0",
         "--max-sessions", "1", "--token", "s3cret", "--ssl-cert", str(d / "cert.pem"), "--ssl-key",
         str(d / "key.pem")],
        env={**os.environ, "PERSONAPLEX_FAST_CACHE": str(served["dirs"]["cache"])},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving https://"), (line, proc.stderr.read() if proc.poll() else "")
        yield line.split()[1].rstrip("/"), d / "cert.pem"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_tls_with_a_token(tls_served):
    import ssl

    base, cert = tls_served
    ctx = ssl.create_default_context(cafile=str(cert))

    def get(path):
        try:
            with urllib.request.urlopen(base + path, context=ctx, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    code, body = get("/api/info")
    assert code == 401 and "needs its token" in one_line(body)
    assert get("/api/info?token=wrong")[0] == 401
    assert get("/api/info?token=s3cret")[0] == 200
    assert get("/")[0] == 200  # the page itself is public; it passes ?token= on

    async def sessions():
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                await http.ws_connect(base.replace("https", "wss") + "/ws", ssl=ctx)
            assert e.value.status == 401
            async with http.ws_connect(base.replace("https", "wss") + "/ws?token=s3cret", ssl=ctx) as ws:
                await ws.send_bytes(start())
                assert (await ws.receive(timeout=10)).data[0] == START

    asyncio.run(sessions())


@pytest.mark.parametrize("args, error", [
    (["--ssl-cert", "cert.pem"], "--ssl-cert and --ssl-key go together"),
    (["--ssl-cert", "missing.pem", "--ssl-key", "missing.pem"], "--ssl-cert missing.pem / --ssl-key missing.pem: "
                                                                "cannot load them"),
    (["--idle-timeout", "0"], "--idle-timeout 0.0: must be positive"),
])
def test_bad_serve_options_are_one_line(served, tmp_path, args, error):
    proc = subprocess.run([sys.executable, "-m", "personaplex_fast.cli", "serve", "--model", str(served["model"]),
                           "--port", "0", *args], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PERSONAPLEX_FAST_CACHE": str(served["dirs"]["cache"])})
    assert proc.returncode == 2 and error in one_line(proc.stderr.strip()), proc.stderr
