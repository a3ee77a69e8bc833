"""`serve`: live conversations from web pages, all sessions batched into one engine tick.

Two protocols, one websocket per conversation: PersonaPlex's own at /api/chat (Ogg-Opus,
the official web client's and our page's; api_chat.py), and ours at /ws, raw float32 PCM
for programs on a fast link (pcm_protocol.py).

GET / is the page (web/, or a client bundle: --static, the model's dist.tgz), GET
/api/info lists the voices and the session limit.

One engine has --max-sessions slots and one task ticks it every 80 ms. A tick takes one
frame from each session's jitter queue (silence when the client is late, oldest frames
dropped when it runs ahead), runs in a worker thread so the event loop keeps serving
sockets, and queues each session's frame and token for its sender task. A client that
stops reading fills its bounded output queue and is disconnected; it never holds up the
tick. Who may connect is gate.py's; who gets a session, and when, admission.py's: a
slot is reserved before any work, and a prompt's prefill runs in slices between ticks.
Joins, prefill slices, leaves and ticks all go through the one worker thread, so MLX is
only ever driven from one thread.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from .admission import Admission, Limits
from .audio import SAMPLE_RATE
from .engine import Engine, is_text
from .bundle import OURS
from .errors import ProtocolError, UserError
from .gate import Gate, GatedSite, tls_context
from .pcm_protocol import MAX_MESSAGE, PcmWire, parse_start

FRAME_S = 0.08
# 640 ms of client audio may wait for a tick (network jitter); more is stale, drop it.
JITTER_FRAMES = 8
# Unsent messages (frames and tokens, ~2 s of audio) on top of the send buffers: the
# client stopped reading.
OUTPUT_MESSAGES = 30
# Kernel and transport send buffers per socket: without a cap Linux grows them to
# megabytes, a minute of audio, before a client that stopped reading shows as one.
SEND_BUFFER = 32 * 1024
HEARTBEAT_S = 20.0
# Behind by more than this, the clock restarts instead of bursting ticks to catch up.
MAX_LAG_S = 4 * FRAME_S
_CLOSED = (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR)


@dataclass
class Session:
    ws: web.WebSocketResponse
    request: web.Request
    slot: int
    wire: object  # PcmWire or api_chat.OpusWire: the session's message format
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


class Socket(web.WebSocketResponse):
    """A websocket that tells its client why before aiohttp closes it for a frame it
    cannot take (too large, bad opcode or UTF-8): an error message in the session's
    format (`wire`), then the close."""

    _WHY = {WSCloseCode.MESSAGE_TOO_BIG: f"message larger than {MAX_MESSAGE} bytes",
            WSCloseCode.PROTOCOL_ERROR: "malformed websocket frame",
            WSCloseCode.INVALID_TEXT: "text message is not UTF-8"}
    wire = PcmWire

    async def close(self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True) -> bool:
        if code in self._WHY and not self.closed:
            log(f"closing a websocket: {self._WHY[code]}")
            try:
                await asyncio.wait_for(self.send_bytes(self.wire.error(self._WHY[code])), 2.0)
            except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                pass
        return await super().close(code=code, message=message, drain=drain)


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


# The worker thread waits for each tick with the GIL released and takes it back a few
# times a tick (the evaluation returning, the numpy copies, the executor's hand-offs).
# While other threads run Python (an event loop busy with a hundred sessions' messages;
# under Ray Serve, two of them), each take waits up to the interpreter's switch interval,
# 5 ms by default: tens of ms a tick. bench/switch_interval.py shows the effect.
SWITCH_INTERVAL_S = 0.0005


class Server:
    def __init__(self, model, engine: Engine, sampling, seed: int = 0, limits: Limits = Limits(),
                 gate: Gate | None = None, page: Path = OURS):
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        self.model, self.engine, self.limits, self.page = model, engine, limits, page
        self.gate = gate or Gate(limits, "127.0.0.1")
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="engine")
        self.sessions: dict[int, Session] = {}
        self.wake = asyncio.Event()
        self.admission = Admission(model, engine, self.in_worker, self.wake, limits, seed, sampling)
        self.admission.load_voices(available_voices(model), log)

    async def in_worker(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.gate.middleware(log)], client_max_size=MAX_MESSAGE)
        app.router.add_get("/", lambda _: web.FileResponse(self.page / "index.html"))
        app.router.add_get("/api/info", self.info)
        app.router.add_get("/ws", self.handle)
        app.router.add_get("/api/chat", self.handle_chat)
        app.router.add_static("/", self.page)
        return app

    async def info(self, _request) -> web.Response:
        return web.json_response({"voices": list(self.admission.voices), "max_sessions": self.engine.slots,
                                  "sessions": len(self.sessions), "frame_size": self.engine.frame_size,
                                  "sample_rate": SAMPLE_RATE})

    # -- the tick

    async def tick_loop(self) -> None:
        loop = asyncio.get_running_loop()
        batch = np.zeros((self.engine.slots, self.engine.frame_size), dtype=np.float32)
        deadline = loop.time()
        while True:
            if not self.sessions:
                # Nobody to delay: prompts run in whole slices, one at a time, so a
                # session that joins starts ticking after at most one slice.
                if not self.admission.pending():
                    self.wake.clear()
                    await self.wake.wait()
                await self.admission.work(None)
                deadline = loop.time()
                continue
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
            if self.admission.pending():
                await self.admission.work(deadline)
            await asyncio.sleep(max(0.0, deadline - loop.time()))

    def deliver(self, s: Session, pcm: np.ndarray, token: int) -> None:
        text = self.model.decode_text(token) if is_text(token) else ""
        msgs = s.wire.output(pcm, token, text, s.ticks)
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
        """/ws, our protocol: START names the voice and prompt."""
        wire = PcmWire(self.engine.frame_size)
        ws = await self.open_socket(request, wire)

        async def start():
            return (*parse_start(await ws.receive(timeout=self.limits.handshake_timeout_s)), None)

        return await self.converse(ws, request, wire, start)

    async def handle_chat(self, request: web.Request) -> web.WebSocketResponse:
        """/api/chat, PersonaPlex's protocol (api_chat.py): the query names them."""
        from .api_chat import OpusWire, chat_params

        wire = OpusWire(self.engine.frame_size, SAMPLE_RATE)
        ws = await self.open_socket(request, wire)

        async def start():
            return chat_params(request.query)

        return await self.converse(ws, request, wire, start)

    @staticmethod
    async def open_socket(request: web.Request, wire) -> Socket:
        ws = Socket(max_msg_size=MAX_MESSAGE, heartbeat=HEARTBEAT_S, compress=False)
        ws.wire = wire
        await ws.prepare(request)
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            request.transport.set_write_buffer_limits(high=SEND_BUFFER)
        return ws

    async def converse(self, ws: Socket, request: web.Request, wire, start) -> Socket:
        """One session from its parameters (`start`: -> voice, prompt, seed) to its end:
        measured and checked, a slot reserved, its prompt run, then frames both ways."""
        ticket = session = recv = None
        lim = self.limits
        loop = asyncio.get_running_loop()
        try:
            voice, prompt, seed = await start()
            prefill = self.admission.plan(voice, prompt, seed)  # measured, not run
            ticket = self.admission.reserve(seed)
            self.gate.admitted(request)
            slot, recv = await self.admit(ws, wire, ticket, prefill)
            if slot is None:
                return ws  # the client left while its prompt waited
            session = self.sessions[slot] = Session(ws, request, slot, wire)
            self.wake.set()
            log(f"session {slot}: joined from {request.remote} at {request.path}, prompts ran: voice="
                f"{voice or '-'} prompt={len(prompt)} chars, {len(prefill.frames) if prefill else 0} frames "
                f"({len(self.sessions)}/{self.engine.slots})")
            await ws.send_bytes(wire.ready(voice, prompt))
            session.sender = asyncio.create_task(self.send_loop(session))
            idle_until = loop.time() + lim.idle_timeout_s
            while not session.closed:
                msg = await asyncio.wait_for(recv, max(0.0, idle_until - loop.time()))
                if msg.type in _CLOSED:
                    break
                frames = wire.frames(msg)
                if frames is not None:  # an audio message (None: one the protocol ignores)
                    idle_until = loop.time() + lim.idle_timeout_s
                    for frame in frames:
                        session.push(frame)
                recv = asyncio.ensure_future(ws.receive())
        except (ProtocolError, UserError) as e:
            await self.fail(ws, wire, session, str(e))
        except asyncio.TimeoutError:
            what = "no START message" if ticket is None else "no audio"
            wait = lim.handshake_timeout_s if ticket is None else lim.idle_timeout_s
            await self.fail(ws, wire, session, f"{what} within {wait:.0f} s; closing")
        except ConnectionError:
            pass  # the client went away mid-send; nothing to tell it
        finally:
            if recv is not None and not recv.done():
                recv.cancel()
            if session is not None:
                await self.leave(session)
            if ticket is not None:
                await self.admission.leave(ticket)
            if not ws.closed:
                try:
                    await asyncio.wait_for(ws.close(), 2.0)
                except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                    pass
        return ws

    async def admit(self, ws, wire, ticket, prefill) -> tuple[int | None, asyncio.Future]:
        """Wait for the ticket's join while watching the socket: a client that leaves
        first gets slot None (the caller releases its ticket, which drops its prompt).
        -> (slot, the socket's pending receive, for the session to go on with)."""
        joined = asyncio.ensure_future(self.admission.join(ticket, prefill))
        recv = asyncio.ensure_future(ws.receive())
        try:
            while True:
                await asyncio.wait({joined, recv}, return_when=asyncio.FIRST_COMPLETED)
                if recv.done():
                    msg = recv.result()
                    if msg.type in _CLOSED:
                        return None, recv
                    wire.frames(msg)  # checked, but too early: its frames are dropped
                    recv = asyncio.ensure_future(ws.receive())
                elif joined.done():
                    return joined.result(), recv
        except BaseException:
            recv.cancel()
            raise
        finally:
            joined.cancel()

    async def leave(self, s: Session) -> None:
        s.closed = True
        if s.sender is not None:
            s.sender.cancel()
        self.sessions.pop(s.slot, None)
        log(f"session {s.slot}: left after {s.ticks} ticks, late={s.late} dropped={s.dropped}")

    async def fail(self, ws, wire, s: Session | None, error: str) -> None:
        log(f"session {s.slot if s else '-'}: error: {error}")
        if s is not None and s.sender is not None:
            s.sender.cancel()
        if not ws.closed:
            try:
                await asyncio.wait_for(ws.send_bytes(wire.error(error)), 2.0)
            except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                pass


def log(line: str) -> None:
    print(f"serve: {line}", file=sys.stderr, flush=True)


async def _serve(server: Server, host: str, port: int, tls) -> None:
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await GatedSite(runner, host, port, server.gate, tls).start()
    except OSError as e:
        await runner.cleanup()
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --host/--port") from None
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    ticker, stopper = asyncio.create_task(server.tick_loop()), asyncio.create_task(stop.wait())
    bound = runner.addresses[0]
    print(f"serving {'https' if tls else 'http'}://{bound[0]}:{bound[1]}/ ({server.engine.slots} sessions)",
          flush=True)
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


# What a slot costs besides its LM KV cache (Mimi's state and KV, the tick's activations:
# a few MB measured; rounded up), what the device keeps free for workspace, and the
# default number of slots where memory allows more (a GPU: the largest batch measured in
# real time, docs/PERF.md; the CPU ticks the 7B model far slower than real time).
SLOT_STATE_BYTES = 64 << 20
DEVICE_RESERVE_BYTES = 2 << 30
DEFAULT_SLOTS = {"gpu": 64, "cpu": 4}


@dataclass(frozen=True)
class Fit:
    sessions: int  # how many sessions' KV caches and state fit in what is free
    per_session: int  # bytes
    free: int  # bytes free after the weights


def sessions_fit(cfg, itemsize: int, kv_bits: int | None, free: int) -> Fit:
    per = cfg.kv_bytes(1, itemsize, kv_bits) + SLOT_STATE_BYTES
    reserve = DEVICE_RESERVE_BYTES + free // 20
    return Fit(max(0, (free - reserve) // per), per, free)


def engine_slots(model, max_sessions: int | None, kv_bits: int | None) -> int:
    """--max-sessions, checked against the free memory, or (None) sized from it: the
    sessions that fit, at most DEFAULT_SLOTS; both said in one line on stderr."""
    from .checkpoint import free_device_memory

    fit = sessions_fit(model.lm.cfg, model.lm.dtype.size, kv_bits, free_device_memory())
    gib = 2**30
    if max_sessions is not None and max_sessions < 1:
        raise UserError(f"--max-sessions {max_sessions}: needs at least 1")
    if max_sessions is not None and max_sessions > fit.sessions:
        raise UserError(f"--max-sessions {max_sessions}: their KV caches need "
                        f"{max_sessions * fit.per_session / gib:.1f} GiB, {fit.free / gib:.1f} GiB is free: "
                        f"{fit.sessions} sessions fit")
    if fit.sessions < 1:
        raise UserError(f"not one session fits: {fit.per_session / gib:.2f} GiB of KV cache and state each, "
                        f"{fit.free / gib:.1f} GiB free")
    kind = "gpu" if mx.default_device() == mx.gpu else "cpu"
    slots = max_sessions or min(fit.sessions, DEFAULT_SLOTS[kind])
    why = "--max-sessions" if max_sessions else f"the {kind.upper()} default; --max-sessions to change"
    log(f"{fit.sessions} sessions fit in {fit.free / gib:.1f} GiB free ({fit.per_session / gib:.2f} GiB of KV "
        f"cache and state each); {slots} slots ({why})")
    return slots


def warm_engine(model, slots: int, sampling, seed: int = 0, kv_bits: int | None = None) -> Engine:
    """The engine of one server (or cluster replica), its first tick already run."""
    engine = model.engine(slots=slots, sampling=sampling, seed=seed, kv_bits=kv_bits)
    # The first tick compiles and allocates; pay for it before anyone is listening.
    engine.tick(np.zeros((engine.slots, engine.frame_size), dtype=np.float32))
    return engine


def serve(model, host: str, port: int, max_sessions: int | None, sampling, seed: int = 0, limits: Limits = Limits(),
          allow_origins: tuple[str, ...] = (), token: str | None = None, ssl_cert: str | None = None,
          ssl_key: str | None = None, static: str | None = None, kv_bits: int | None = None) -> None:
    from .bundle import page_folder

    tls = tls_context(ssl_cert, ssl_key)
    slots = engine_slots(model, max_sessions, kv_bits)
    page, what = page_folder(model, static)
    log(f"page: {what}")
    engine = warm_engine(model, slots, sampling, seed, kv_bits)

    async def main():
        gate = Gate(limits, host, allow_origins, token)
        await _serve(Server(model, engine, sampling, seed, limits, gate, page), host, port, tls)

    asyncio.run(main())
