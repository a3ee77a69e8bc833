"""`personaplex-fast serve` over loopback: batched sessions, bad clients, slow clients."""

import asyncio
import base64
import json
import os
import socket
import struct
import time
import urllib.request

import aiohttp
import numpy as np
import pytest

START, AUDIO, TEXT, ERROR = 0, 1, 2, 3
FRAME = 1920


@pytest.fixture(scope="module")
def server(tiny_server):
    return tiny_server


def speechlike(frames: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(frames * FRAME) / 24000
    return (0.3 * np.sin(2 * np.pi * (150 + 50 * rng.random()) * t) * np.sin(2 * np.pi * 2 * t) ** 2
            ).astype(np.float32).reshape(frames, FRAME)


def packet(kind: int, payload) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return bytes([kind]) + payload


async def converse(base: str, frames: int, seed: int = 0, voice: str = "", prompt: str = "",
                   spoil: bytes | str | None = None, until_text: bool = False) -> dict:
    """Stream frames in real time and collect what comes back, until `frames` frames came
    back (and a text token, with `until_text`: the tiny model prints one token in ~10);
    `spoil` is sent instead of the fourth frame."""
    pcm = speechlike(frames * 4 if until_text else frames, seed)
    got = {"audio": [], "text": [], "error": None, "arrivals": []}
    async with aiohttp.ClientSession() as http, http.ws_connect(base.replace("http", "ws") + "/ws") as ws:
        await ws.send_bytes(packet(START, {"voice": voice, "prompt": prompt}))
        first = await ws.receive(timeout=10)
        if first.data[0] == ERROR:
            got["error"] = json.loads(first.data[1:])["error"]
            return got
        assert first.data[0] == START, first

        async def send():
            for i, frame in enumerate(pcm):
                if i == 3 and spoil is not None:
                    await (ws.send_str(spoil) if isinstance(spoil, str) else ws.send_bytes(spoil))
                else:
                    await ws.send_bytes(packet(AUDIO, frame.astype("<f4").tobytes()))
                await asyncio.sleep(0.08)

        sender = asyncio.create_task(send())
        try:
            while len(got["audio"]) < len(pcm) and (len(got["audio"]) < frames
                                                      or (until_text and not got["text"])):
                msg = await ws.receive(timeout=5)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                kind, body = msg.data[0], msg.data[1:]
                if kind == AUDIO:
                    got["audio"].append(np.frombuffer(body, dtype="<f4"))
                    got["arrivals"].append(time.monotonic())
                elif kind == TEXT:
                    got["text"].append(json.loads(body))
                elif kind == ERROR:
                    got["error"] = json.loads(body)["error"]
        finally:
            sender.cancel()
    return got


def sessions(base: str) -> int:
    with urllib.request.urlopen(base + "/api/info") as r:
        return json.load(r)["sessions"]


def test_two_sessions_each_get_audio_and_text(server):
    async def both():
        return await asyncio.gather(
            converse(server, 40, seed=0, until_text=True),
            converse(server, 40, seed=1, voice="NATF0", prompt="You enjoy having a good conversation.",
                     until_text=True))

    for got in asyncio.run(both()):
        assert got["error"] is None
        assert len(got["audio"]) >= 40 and all(f.shape == (FRAME,) for f in got["audio"])
        assert max(np.abs(f).max() for f in got["audio"]) > 1e-3  # the model spoke
        assert got["text"] and all(t["text"] for t in got["text"])
    assert sessions(server) == 0


@pytest.mark.parametrize("spoil, error", [
    (packet(AUDIO, b"\0" * 100), "AUDIO must be 1920 float32"),
    (packet(AUDIO, b"\0" * 10_000), "AUDIO must be 1920 float32"),
    (packet(AUDIO, b"\0" * 200_000), "message larger than 65536 bytes"),
    (packet(AUDIO, np.full(FRAME, np.nan, "<f4").tobytes()), "NaN"),
    (packet(9, b"x"), "unexpected message kind 9"),
    ("hello", "expected a binary AUDIO message"),
])
def test_a_bad_frame_closes_only_that_session(server, spoil, error):
    async def run():
        return await asyncio.gather(converse(server, 25, seed=2), converse(server, 25, seed=3, spoil=spoil))

    good, bad = asyncio.run(run())
    assert error in bad["error"] and len(bad["audio"]) < 25
    assert good["error"] is None and len(good["audio"]) == 25


def test_start_errors_are_reported(server):
    async def run():
        unknown = await converse(server, 5, voice="NOBODY")
        full = await asyncio.gather(*(converse(server, 20, seed=i) for i in range(4)))
        return unknown, full

    unknown, full = asyncio.run(run())
    assert "unknown voice 'NOBODY'" in unknown["error"] and "NATF0" in unknown["error"]
    errors = [g["error"] for g in full]
    assert sum(e is None for e in errors) == 3
    assert any(e and "the server is full (3 sessions); try again later" in e for e in errors)


def raw_ws_client(base: str) -> socket.socket:
    """A websocket client that starts a session and then never reads (tiny receive buffer)."""
    host, port = base.removeprefix("http://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b" 101 " in s.recv(1024)
    payload = packet(START, {"voice": "", "prompt": ""})
    mask = os.urandom(4)
    s.sendall(struct.pack("!BB", 0x82, 0x80 | len(payload)) + mask
              + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    return s


def test_a_client_that_stops_reading_does_not_stall_the_others(server):
    slow = raw_ws_client(server)
    try:
        t0 = time.monotonic()
        good = asyncio.run(converse(server, 50, seed=4))
        elapsed = time.monotonic() - t0
        assert good["error"] is None and len(good["audio"]) == 50
        assert elapsed < 50 * 0.08 + 1.5
        assert np.diff(good["arrivals"]).max() < 0.4
        # The slow client's output queue filled up and it was dropped.
        deadline = time.monotonic() + 10
        while sessions(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sessions(server) == 0
    finally:
        slow.close()


def test_the_server_takes_the_gil_back_within_half_a_millisecond(tiny):
    """The worker thread takes the GIL back a few times a tick; at the interpreter's default
    switch interval (5 ms) each take can wait that long while an event loop is busy (the
    serve --replicas measurement on the H200: bench/switch_interval.py). A Server lowers it
    for its process, and never raises it."""
    import sys

    from personaplex_fast.engine import Engine
    from personaplex_fast.loading import load_model
    from personaplex_fast.sampling import SamplingConfig
    from personaplex_fast.server import SWITCH_INTERVAL_S, Server

    GREEDY = SamplingConfig(greedy=True)

    model = load_model(tiny)
    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        Server(model, Engine(model.lm, model.mimi, slots=1, sampling=GREEDY), GREEDY).worker.shutdown()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S, rel=0.05)
        sys.setswitchinterval(0.0001)
        Server(model, Engine(model.lm, model.mimi, slots=1, sampling=GREEDY), GREEDY).worker.shutdown()
        assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.05)
    finally:
        sys.setswitchinterval(before)
