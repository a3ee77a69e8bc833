"""`serve --replicas N`: the conversations of `serve` on Ray Serve, across GPUs and hosts.

    browser --/ws--> Ray Serve's proxy (one per node) --the same socket--> one Replica

A Replica is one process with one GPU (or the CPU) and exactly what `serve` runs on one
machine: a server.Server with its batched Engine, Admission and tick loop. Ray Serve
owns the rest: placement (a GPU per replica, on any host of the cluster), the HTTP
proxies, health checks and restarts, autoscaling, metrics.

- A conversation is one websocket, which Serve's proxy forwards to one replica for the
  socket's life (one "ongoing request" there), so it stays on that replica.
- New conversations go to the replica with the fewest requests that its proxy has sent
  and not seen finish, counted from the moment it is chosen, under its
  max_ongoing_requests (cluster_routing.FewestFirst: Serve's default router compares two
  random replicas, which past two replicas can pick a full one while another has room,
  and Serve's counts lag behind a burst of conversations started at once).
  max_ongoing_requests is the slots plus room for sockets not yet in a session, so a
  full cluster still reaches a replica, whose Admission answers exactly as a full
  `serve` does: "the server is full (N sessions); try again later".
- A client that stops reading: a replica's sends reach its proxy through Ray without
  backpressure, so the replica never sees the client fall behind; the bound is the
  proxy's (cluster_routing.BoundedSends, a middleware of every proxy through Serve's
  PROXY_CALLBACK variable, set on the controller, whose runtime_env the proxies inherit):
  the socket's buffers capped and OUTPUT_MESSAGES queued as in `serve`, then the client
  is cut off and the replica hears it leave.
- A replica that dies closes only its own sockets; Serve starts another in its place.
- The protocol codec runs where the socket ends: in the replica, in front of its tick
  loop, as server.Server.converse over the Starlette websocket that Ray Serve's ingress
  hands us (Socket and Peer below make it look like aiohttp's). A separate codec
  deployment would need the frames of one conversation to flow both ways between two
  deployments, which Serve's handles do not do (their calls are unary or stream one way).
- Metrics (Ray's: Prometheus on every node's metrics export port, tagged by replica):
  personaplex_sessions, personaplex_slots, personaplex_tick_ms{quantile=p50|p99} over
  the last 20 s and the histogram personaplex_tick_seconds, personaplex_dropped_frames
  (client frames dropped because the client ran ahead) and personaplex_late_frames
  (ticks that fed silence because the client's frame was late).

Ray is imported here and in cluster_routing.py only: the plain install and `serve` never load it.
"""

import asyncio
import json
import os
import re
import signal
import threading
import time
import zlib
from collections import deque

import mlx.core as mx
import numpy as np
from aiohttp import WSCloseCode, WSMessage, WSMsgType
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import FileResponse, PlainTextResponse
from ray import serve
from ray.serve import metrics
from ray.serve.config import RequestRouterConfig

from .admission import Limits
from .cluster_routing import BOUNDED, PROXY_CALLBACK
from .errors import UserError
from .gate import Gate
from .audio import SAMPLE_RATE
from .bundle import OURS as WEB
from .pcm_protocol import MAX_MESSAGE, PcmWire, parse_start
from .server import DEFAULT_SLOTS, Server, Socket as AiohttpSocket, engine_slots, log, warm_engine

APP = "personaplex"
# Ticks in the rolling window of the tick-time quantiles (20 s).
TICK_WINDOW = 250
METRICS_PERIOD_S = 1.0
TICK_BUCKETS_S = [0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.1, 0.15, 0.25, 0.5]
_CLOSE = WSMessage(WSMsgType.CLOSE, WSCloseCode.OK, None)


# -- Starlette's websocket as server.Server.converse reads aiohttp's


class Socket:
    """receive() -> aiohttp WSMessage, send_bytes, close, closed; and abort() (for Peer's
    transport: a client that stopped reading), which ends a pending receive at once."""

    def __init__(self, ws: WebSocket, wire):
        self.ws, self.wire, self.closed = ws, wire, False  # wire: the session's format (errors)
        self._ended = False  # abort() or close(): a pending receive ends, later ones at once
        self._pending: asyncio.Future | None = None

    async def receive(self, timeout: float | None = None) -> WSMessage:
        return await asyncio.wait_for(self._next(), timeout)

    async def _next(self) -> WSMessage:
        # One task a message (a receive abort() can cancel): every frame of every session
        # passes here, in the process whose worker thread drives the engine.
        if self.closed or self._ended:
            return _CLOSE
        self._pending = inner = asyncio.ensure_future(self.ws.receive())
        try:
            msg = await inner  # a cancel of this coroutine cancels inner too
        except asyncio.CancelledError:
            if self._ended and inner.cancelled():
                return _CLOSE
            raise
        finally:
            self._pending = None
        if msg["type"] == "websocket.disconnect":
            self.closed = True
            return WSMessage(WSMsgType.CLOSE, msg.get("code", WSCloseCode.OK), None)
        data = msg.get("bytes")
        if data is None:
            text = msg.get("text") or ""
            return WSMessage(WSMsgType.TEXT, text, None) if len(text) <= MAX_MESSAGE else await self._too_big()
        return WSMessage(WSMsgType.BINARY, data, None) if len(data) <= MAX_MESSAGE else await self._too_big()

    async def _too_big(self) -> WSMessage:
        # Serve's proxy takes messages up to its own limit; refuse past ours as `serve` does.
        why = AiohttpSocket._WHY[WSCloseCode.MESSAGE_TOO_BIG]
        log(f"closing a websocket: {why}")
        try:
            await self.send_bytes(self.wire.error(why))
        except (ConnectionError, RuntimeError):
            pass
        await self.close(code=WSCloseCode.MESSAGE_TOO_BIG)
        return _CLOSE

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("websocket closed")
        await self.ws.send_bytes(data)

    async def close(self, code: int = WSCloseCode.OK) -> None:
        if self.closed:
            return
        self.closed = True
        self._end()
        try:
            await self.ws.close(code)
        except RuntimeError:
            pass  # the client had already gone

    def _end(self) -> None:
        self._ended = True
        if self._pending is not None:
            self._pending.cancel()

    def abort(self) -> None:
        self._end()
        asyncio.ensure_future(self.close(WSCloseCode.POLICY_VIOLATION))


class Peer:
    """What Server.converse and Gate.refusal read of an aiohttp request, from Starlette's."""

    protocol = None  # the socket is Ray Serve's proxy's, not one the gate counts

    def __init__(self, conn, transport: Socket | None = None):
        self.headers, self.query, self.path = conn.headers, conn.query_params, conn.url.path
        self.scheme = {"ws": "http", "wss": "https"}.get(conn.url.scheme, conn.url.scheme)
        self.remote = conn.client.host if conn.client else None
        self.method = conn.scope.get("method", "GET")
        self.transport = transport


# -- metrics


class TimedEngine:
    """The engine, with the wall time of each tick kept for the metrics."""

    def __init__(self, engine):
        self.engine = engine
        self.ticks: deque[float] = deque(maxlen=TICK_WINDOW)
        self.fresh: deque[float] = deque(maxlen=TICK_WINDOW)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def tick(self, pcm):
        t = time.perf_counter()
        out = self.engine.tick(pcm)
        dt = time.perf_counter() - t
        self.ticks.append(dt)
        self.fresh.append(dt)
        return out


class Metrics:
    def __init__(self, slots: int):
        self.sessions = metrics.Gauge("personaplex_sessions", description="conversations on this replica")
        self.slots = metrics.Gauge("personaplex_slots", description="engine slots of this replica")
        self.tick_ms = metrics.Gauge("personaplex_tick_ms", tag_keys=("quantile",),
                                     description=f"engine tick time over the last {TICK_WINDOW} ticks, ms")
        self.tick_s = metrics.Histogram("personaplex_tick_seconds", boundaries=TICK_BUCKETS_S,
                                        description="engine tick time, s")
        self.dropped = metrics.Counter("personaplex_dropped_frames",
                                       description="client frames dropped because the client ran ahead")
        self.late = metrics.Counter("personaplex_late_frames",
                                    description="ticks that fed silence because the client's frame was late")
        self.slot_count = slots
        self.seen: dict[int, tuple[int, int]] = {}  # id(session) -> (dropped, late) counted

    def count(self, s, last: bool = False) -> None:
        dropped, late = self.seen.pop(id(s), (0, 0))
        if s.dropped > dropped:
            self.dropped.inc(s.dropped - dropped)
        if s.late > late:
            self.late.inc(s.late - late)
        if not last:
            self.seen[id(s)] = (s.dropped, s.late)

    def report(self, server: Server, engine: TimedEngine) -> None:
        self.slots.set(self.slot_count)
        self.sessions.set(len(server.sessions))
        for s in list(server.sessions.values()):
            self.count(s)
        while engine.fresh:
            self.tick_s.observe(engine.fresh.popleft())
        if engine.ticks:
            p50, p99 = np.percentile(np.array(engine.ticks) * 1000, [50, 99])
            self.tick_ms.set(float(p50), tags={"quantile": "p50"})
            self.tick_ms.set(float(p99), tags={"quantile": "p99"})


class MeteredServer(Server):
    """server.Server that counts each session's dropped and late frames as it leaves."""

    metrics: Metrics

    async def leave(self, s) -> None:
        await super().leave(s)
        self.metrics.count(s, last=True)


# -- the replica


api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


@serve.deployment(name="Replica", health_check_period_s=2.0, max_constructor_retry_count=2,
                  request_router_config=RequestRouterConfig(
                      request_router_class="personaplex_fast.cluster_routing:FewestFirst"))
@serve.ingress(api)
class Replica:
    def __init__(self, source: str, max_sessions: int | None, sampling, seed: int, limits: Limits, host: str,
                 allow_origins: tuple[str, ...], token: str | None, mode: str, kv_bits: int | None = None):
        from . import ops
        from .loading import load_model

        ops.set_mode(mode)
        self.id = serve.get_replica_context().replica_id.unique_id
        self.unbounded_told = False  # said once: this replica's proxy lacks BoundedSends
        model = load_model(source)
        seed_here = (seed + zlib.crc32(self.id.encode())) & 0x7FFFFFFF  # replicas sample apart
        slots = engine_slots(model, max_sessions, kv_bits)
        self.engine = TimedEngine(warm_engine(model, slots, sampling, seed_here, kv_bits))
        self.server = MeteredServer(model, self.engine, sampling, seed, limits, Gate(limits, host, allow_origins, token))
        self.server.metrics = Metrics(self.engine.slots)
        loop = asyncio.get_running_loop()
        self.ticker = loop.create_task(self.server.tick_loop())
        self.reporter = loop.create_task(self._report())
        log(f"replica {self.id}: pid {os.getpid()}, {self.engine.slots} sessions on {mx.default_device()}")

    async def _report(self) -> None:
        while True:
            self.server.metrics.report(self.server, self.engine)
            await asyncio.sleep(METRICS_PERIOD_S)

    def check_health(self) -> None:
        if self.ticker.done():
            raise RuntimeError(f"replica {self.id}: the tick loop stopped: {self.ticker!r}")

    async def __del__(self):
        if not hasattr(self, "reporter"):
            return  # the constructor failed
        self.ticker.cancel()
        self.reporter.cancel()
        # As in `serve`: MLX's stream of the worker thread is released inside the thread.
        await self.server.in_worker(mx.clear_streams)
        self.server.worker.shutdown()

    def _refused(self, peer: Peer) -> PlainTextResponse | None:
        refused = self.server.gate.refusal(peer)
        if refused is None:
            return None
        log(f"refused {peer.method} {peer.path} from {peer.remote}: {refused[1]}")
        return PlainTextResponse(refused[1] + "\n", status_code=refused[0])

    async def _converse(self, websocket: WebSocket, wire, start) -> None:
        """One conversation, as server.Server's handlers run it; start(sock, peer) -> (voice,
        prompt, seed) as the protocol names them."""
        sock = Socket(websocket, wire)
        peer = Peer(websocket, sock)
        if BOUNDED not in websocket.scope and not self.unbounded_told:
            self.unbounded_told = True
            log(f"replica {self.id}: Serve's proxy does not bound what waits for a client (set {PROXY_CALLBACK[0]}="
                f"{PROXY_CALLBACK[1]} where the proxies run): a client that stops reading is not disconnected")
        refused = self._refused(peer)
        if refused is not None:
            try:
                await websocket.send_denial_response(refused)  # the status and line of `serve`
            except RuntimeError:
                await websocket.close(WSCloseCode.POLICY_VIOLATION)  # no such ASGI extension: a 403
            return
        await websocket.accept(headers=[(b"x-replica", self.id.encode())])

        async def begin():
            return await start(sock, peer)

        await self.server.converse(sock, peer, wire, begin)

    @api.websocket("/ws")
    async def ws(self, websocket: WebSocket) -> None:
        """Our protocol (pcm_protocol.py): START names the voice and prompt."""
        timeout = self.server.limits.handshake_timeout_s

        async def start(sock, peer):
            return (*parse_start(await sock.receive(timeout=timeout)), None)

        await self._converse(websocket, PcmWire(self.server.engine.frame_size), start)

    @api.websocket("/api/chat")
    async def chat(self, websocket: WebSocket) -> None:
        """PersonaPlex's protocol (api_chat.py, Ogg-Opus): the query names them."""
        from .api_chat import OpusWire, chat_params

        async def start(sock, peer):
            return chat_params(peer.query)

        await self._converse(websocket, OpusWire(self.server.engine.frame_size, SAMPLE_RATE), start)

    @api.get("/api/info")
    async def info(self, request: Request):
        refused = self._refused(Peer(request))
        if refused is not None:
            return refused
        info = json.loads((await self.server.info(None)).body)
        return {**info, "replica": {"id": self.id, "pid": os.getpid()}}

    @api.get("/")
    async def page(self, request: Request):
        return self._refused(Peer(request)) or FileResponse(WEB / "index.html")

    @api.get("/{name}")
    async def static(self, name: str, request: Request):
        refused = self._refused(Peer(request))
        if refused is not None:
            return refused
        files = {p.name for p in WEB.iterdir() if p.is_file()}
        return FileResponse(WEB / name) if name in files else PlainTextResponse("not found\n", status_code=404)


# -- building and running the application


def application(args):
    """The Serve application for `serve`'s parsed arguments (cli.py)."""
    from .checkpoint import is_hf_name, resolve
    from .cli import serve_limits, sampling_from

    if args.replicas < 1:
        raise UserError(f"--replicas {args.replicas}: needs at least 1")
    if not is_hf_name(str(args.model)):
        resolve(args.model)  # a missing folder is told here, not by every replica's log
    limits = serve_limits(args)
    gpus = args.num_gpus if args.num_gpus is not None else int(mx.cuda.is_available())
    resources = {"num_gpus": gpus} if gpus else {"num_cpus": 1}
    # Without --max-sessions each replica sizes its engine from its own free memory, at
    # most DEFAULT_SLOTS: the bound Serve routes by.
    slots = args.max_sessions or DEFAULT_SLOTS["gpu" if gpus else "cpu"]
    replica = Replica.options(num_replicas=args.replicas,
                              max_ongoing_requests=slots + limits.max_handshakes,
                              ray_actor_options=resources)
    mode = "check" if args.check else "reference" if args.reference else "fused"
    return replica.bind(str(args.model), args.max_sessions, sampling_from(args), args.seed, limits, args.host,
                        tuple(args.allow_origin), args.token, mode, args.kv_bits)


def app(config: dict):
    """`serve run personaplex_fast.cluster:app model=M replicas=N max-sessions=S ...` (or a
    Serve config file's `args`): the keys are `serve`'s options without the dashes."""
    from .cli import build_parser

    argv = ["serve"]
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if v is True or str(v).lower() == "true":
                argv.append(flag)
            elif not (v is False or str(v).lower() == "false"):
                argv += [flag, str(v)]
    args = build_parser().parse_args(argv)
    if args.replicas is None:
        args.replicas = 1
    return application(args)


def run(args) -> None:
    """`personaplex-fast serve --replicas N`: start Ray here (or join --address), deploy,
    serve until SIGINT/SIGTERM, then take it all down."""
    import ray

    if args.port == 0:
        raise UserError("--port 0 with --replicas: Ray Serve's proxies need a fixed port; pick one")
    built = application(args)
    if args.address:
        ray.init(address=args.address, log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas), include_dashboard=False,
                 _metrics_export_port=args.metrics_port)
    try:
        serve.start(http_options={"host": args.host, "port": args.port, "ssl_certfile": args.ssl_cert,
                                  "ssl_keyfile": args.ssl_key},
                    controller_options={"runtime_env": {"env_vars": dict([PROXY_CALLBACK])}})
        try:
            serve.run(built, name=APP, route_prefix="/")
        except RuntimeError as e:
            # The replicas' own error (a UserError of warm_engine, say) ends Serve's message.
            why = serve.status().applications[APP].deployments["Replica"].message or str(e)
            why = re.sub(r"^[\w.]*(Error|Exception): ", "", why.strip().splitlines()[-1])
            raise UserError(f"the replicas did not start: {why:.300}") from None
        scheme = "https" if args.ssl_cert else "http"
        each = args.max_sessions or "their memory's"
        print(f"serving {scheme}://{args.host}:{args.port}/ ({args.replicas} replicas of {each} sessions)",
              flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        if args.address:
            serve.delete(APP)
        else:
            serve.shutdown()
        ray.shutdown()
