"""`serve`: live conversations from web pages, all sessions batched into one engine tick.

Protocol: one websocket per conversation at /ws. Every message is binary: one byte of
kind, then the payload. Audio is 24 kHz mono float32 little-endian, one 80 ms frame
(1920 samples, 7680 bytes) per message.

    client -> server
      0x00 START  UTF-8 JSON {"voice": "" or a name from /api/info, "prompt": "" or role text};
                  the first message, once
      0x01 AUDIO  one frame of microphone audio, sent in real time after READY
    server -> client
      0x00 READY  UTF-8 JSON {"sample_rate", "frame_size", "voice", "prompt"}
      0x01 AUDIO  one frame of model audio per tick
      0x02 TEXT   UTF-8 JSON {"frame": tick index, "token": id, "text": piece}; only for
                  tokens that print (not padding)
      0x03 ERROR  UTF-8 JSON {"error": one line}; the server closes the socket after it

GET / is the page (web/), GET /api/info lists the voices and the session limit.

One engine has --max-sessions slots and one task ticks it every 80 ms. A tick takes one
frame from each session's jitter queue (silence when the client is late, oldest frames
dropped when it runs ahead), runs in a worker thread so the event loop keeps serving
sockets, and queues each session's frame and token for its sender task. A client that
stops reading fills its bounded output queue and is disconnected; it never holds up the
tick. Joins (with their prompt prefill), leaves and ticks all go through the one worker
thread, so sessions come and go between ticks and MLX is only ever driven from one thread;
the price is that a voice/role prompt's prefill delays everyone's next tick by its length.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from aiohttp import WSMsgType, web

from .audio import SAMPLE_RATE
from .engine import Engine, SessionsFull, is_text
from .errors import UserError

START, AUDIO, TEXT, ERROR = 0, 1, 2, 3
READY = START
FRAME_S = 0.08
# 640 ms of client audio may wait for a tick (network jitter); more is stale, drop it.
JITTER_FRAMES = 8
# Unsent messages (frames and tokens, ~2 s of audio) on top of the send buffers: the
# client stopped reading.
OUTPUT_MESSAGES = 30
# Kernel and transport send buffers per socket: without a cap Linux grows them to
# megabytes, a minute of audio, before a client that stopped reading shows as one.
SEND_BUFFER = 32 * 1024
# Larger messages are cut off by aiohttp itself (close code 1009); smaller wrong-sized
# ones get our ERROR message.
MAX_MESSAGE = 1 << 20
MAX_PROMPT_CHARS = 4000
START_TIMEOUT_S = 10.0
# Behind by more than this, the clock restarts instead of bursting ticks to catch up.
MAX_LAG_S = 4 * FRAME_S
WEB = Path(__file__).parent / "web"


class ProtocolError(Exception):
    pass


@dataclass
class Session:
    ws: web.WebSocketResponse
    request: web.Request
    slot: int
    inbox: deque = field(default_factory=lambda: deque(maxlen=JITTER_FRAMES))
    outbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(OUTPUT_MESSAGES))
    sender: asyncio.Task | None = None
    ticks: int = 0
    late: int = 0  # ticks that found no client frame and fed silence
    dropped: int = 0  # client frames dropped because the client ran ahead
    closed: bool = False

    def push(self, frame: np.ndarray) -> None:
        if len(self.inbox) == self.inbox.maxlen:
            self.dropped += 1
        self.inbox.append(frame)


def message(kind: int, payload: bytes | dict) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload).encode()
    return bytes([kind]) + payload


def parse_start(msg, voices: list[str]) -> tuple[str, str]:
    if msg.type != WSMsgType.BINARY or not msg.data or msg.data[0] != START:
        raise ProtocolError("the first message must be START (0x00 + JSON)")
    try:
        start = json.loads(msg.data[1:].decode())
        voice, prompt = str(start.get("voice") or ""), str(start.get("prompt") or "")
    except (ValueError, AttributeError):
        raise ProtocolError("START payload is not a JSON object") from None
    if voice and voice not in voices:
        raise ProtocolError(f"unknown voice {voice!r}; this server has: {', '.join(voices) or 'none'}")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ProtocolError(f"the prompt has {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
    return voice, prompt


def parse_audio(msg, frame_size: int) -> np.ndarray:
    if msg.type != WSMsgType.BINARY:
        raise ProtocolError(f"expected a binary AUDIO message, got {msg.type.name}")
    data = msg.data
    if not data or data[0] != AUDIO:
        raise ProtocolError(f"unexpected message kind {data[0] if data else None}; only AUDIO (1) after START")
    if len(data) != 1 + 4 * frame_size:
        raise ProtocolError(f"AUDIO must be {frame_size} float32 samples ({1 + 4 * frame_size} bytes "
                            f"with the kind byte), got {len(data)} bytes")
    frame = np.frombuffer(data, dtype="<f4", offset=1)
    if not np.isfinite(frame).all():
        raise ProtocolError("AUDIO has NaN or infinite samples")
    return frame


def available_voices(model) -> list[str]:
    """The packaged voices next to the model, fetched now for a Hugging Face model (not
    in the worker thread at a session's start, where the download would stall the tick)."""
    from .checkpoint import is_hf_name
    from .voices import VOICES_ARCHIVE, list_voices, unpack

    archive = model.directory / VOICES_ARCHIVE
    if not archive.exists() and is_hf_name(model.source):
        from .hub import download

        download(model.source, (), optional=(VOICES_ARCHIVE,))
    return list_voices(unpack(archive)) if archive.exists() else []


class Server:
    def __init__(self, model, engine: Engine, sampling, seed: int = 0):
        self.model, self.engine, self.sampling, self.seed = model, engine, sampling, seed
        self.voices = available_voices(model)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.sessions: dict[int, Session] = {}
        self.wake = asyncio.Event()

    async def in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", lambda _: web.FileResponse(WEB / "index.html"))
        app.router.add_get("/api/info", self.info)
        app.router.add_get("/ws", self.handle)
        app.router.add_static("/", WEB)
        return app

    async def info(self, _request) -> web.Response:
        return web.json_response({"voices": self.voices, "max_sessions": self.engine.slots,
                                  "sessions": len(self.sessions), "frame_size": self.engine.frame_size,
                                  "sample_rate": SAMPLE_RATE})

    # -- the tick

    async def tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        batch = np.zeros((self.engine.slots, self.engine.frame_size), dtype=np.float32)
        deadline = loop.time()
        while True:
            if not self.sessions:
                self.wake.clear()
                await self.wake.wait()
                deadline = loop.time()
            live = list(self.sessions.values())
            batch[:] = 0.0
            for s in live:
                if s.inbox:
                    batch[s.slot] = s.inbox.popleft()
                else:
                    s.late += 1
            out = await self.in_worker(self.engine.tick, batch)
            for s in live:
                if not s.closed:
                    self.deliver(s, out.pcm[s.slot], int(out.text[s.slot]))
            deadline += FRAME_S
            if deadline < loop.time() - MAX_LAG_S:
                deadline = loop.time()
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    def deliver(self, s: Session, pcm: np.ndarray, token: int) -> None:
        msgs = [message(AUDIO, pcm.astype("<f4").tobytes())]
        text = self.model.decode_text(token) if is_text(token) else ""
        if text:
            msgs.append(message(TEXT, {"frame": s.ticks, "token": token, "text": text}))
        s.ticks += 1
        for m in msgs:
            try:
                s.outbox.put_nowait(m)
            except asyncio.QueueFull:
                # Too slow to take 2 s of audio: drop the connection, not the tick.
                log(f"session {s.slot}: client stopped reading, disconnecting")
                s.closed = True
                if s.request.transport is not None:
                    s.request.transport.abort()
                return

    @staticmethod
    async def send_loop(s: Session) -> None:
        try:
            while True:
                await s.ws.send_bytes(await s.outbox.get())
        except (ConnectionError, RuntimeError):
            s.closed = True

    # -- one connection

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=20.0)
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            request.transport.set_write_buffer_limits(high=SEND_BUFFER)
        session = None
        try:
            voice, prompt = parse_start(await ws.receive(timeout=START_TIMEOUT_S), self.voices)
            session = await self.join(ws, request, voice, prompt)
            await ws.send_bytes(message(READY, {"sample_rate": SAMPLE_RATE,
                                                "frame_size": self.engine.frame_size,
                                                "voice": voice, "prompt": prompt}))
            session.sender = asyncio.create_task(self.send_loop(session))
            async for msg in ws:
                if session.closed:
                    break
                if msg.type == WSMsgType.ERROR:
                    raise ProtocolError(f"connection error: {ws.exception()}")
                session.push(parse_audio(msg, self.engine.frame_size))
        except (ProtocolError, UserError, SessionsFull) as e:
            await self.fail(ws, session, str(e))
        except asyncio.TimeoutError:
            await self.fail(ws, session, f"no START message within {START_TIMEOUT_S:.0f} s")
        except ConnectionError:
            pass  # the client went away mid-send; nothing to tell it
        finally:
            if session is not None:
                await self.leave(session)
            if not ws.closed:
                try:
                    await asyncio.wait_for(ws.close(), 2.0)
                except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                    pass
        return ws

    async def join(self, ws, request, voice: str, prompt: str) -> Session:
        if len(self.sessions) >= self.engine.slots:
            raise SessionsFull(f"all {self.engine.slots} session slots are in use; try again later")
        state = None
        if voice or prompt:
            state = await self.in_worker(self.model.prompt, voice or None, prompt or None,
                                         self.seed, self.sampling)
        slot = await self.in_worker(self.engine.join, state)
        s = self.sessions[slot] = Session(ws, request, slot)
        self.wake.set()
        log(f"session {slot}: joined from {request.remote} voice={voice or '-'} "
            f"prompt={len(prompt)} chars ({len(self.sessions)}/{self.engine.slots})")
        return s

    async def leave(self, s: Session) -> None:
        s.closed = True
        if s.sender is not None:
            s.sender.cancel()
        del self.sessions[s.slot]
        await self.in_worker(self.engine.leave, s.slot)
        log(f"session {s.slot}: left after {s.ticks} ticks, late={s.late} dropped={s.dropped}")

    async def fail(self, ws, s: Session | None, error: str) -> None:
        log(f"session {s.slot if s else '-'}: error: {error}")
        if s is not None and s.sender is not None:
            s.sender.cancel()
        if not ws.closed:
            try:
                await asyncio.wait_for(ws.send_bytes(message(ERROR, {"error": error})), 2.0)
            except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                pass


def log(line: str) -> None:
    print(f"serve: {line}", file=sys.stderr, flush=True)


async def _serve(server: Server, host: str, port: int) -> None:
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --host/--port") from None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    ticker, stopper = asyncio.create_task(server.tick_loop()), asyncio.create_task(stop.wait())
    bound = runner.addresses[0]
    print(f"serving http://{bound[0]}:{bound[1]}/ ({server.engine.slots} sessions)", flush=True)
    try:
        await asyncio.wait({ticker, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ticker.cancel()
        stopper.cancel()
        await runner.cleanup()
        # MLX gives the worker thread a stream of its own; one torn down at thread exit
        # aborts the process ("terminate called"), so release it from inside the thread.
        await server.in_worker(mx.clear_streams)
        server.worker.shutdown()
    if ticker.done() and not ticker.cancelled():
        ticker.result()  # the tick loop only ends by a bug: raise its traceback


def serve(model, host: str, port: int, max_sessions: int, sampling, seed: int = 0) -> None:
    if max_sessions < 1:
        raise UserError(f"--max-sessions {max_sessions}: needs at least 1")
    engine = model.engine(slots=max_sessions, sampling=sampling, seed=seed)
    # The first tick compiles and allocates; pay for it before anyone is listening.
    engine.tick(np.zeros((engine.slots, engine.frame_size), dtype=np.float32))
    asyncio.run(_serve(Server(model, engine, sampling, seed), host, port))
