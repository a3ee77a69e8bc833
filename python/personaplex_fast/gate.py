"""The door of `serve`: how many may connect, for how long, and from where.

    sockets    at most Limits.max_connections open, and at most max_handshakes of them
               not yet in a session (a TLS handshake, an HTTP request or idle keep-alive,
               a websocket before its START is admitted); past either, a new socket is
               answered "503 ... try again later" and closed, costing no more
    timeouts   each of those steps lasts at most handshake_timeout_s (asyncio's TLS
               handshake timeout, aiohttp's keep-alive timeout, which also closes a
               request that never completes, and the START timeout in server.py)
    Host       on a loopback address only loopback names, or hosts of --allow-origin
               (a DNS-rebinding page reaches 127.0.0.1 under its own name)
    Origin     a browser's websocket (any endpoint) must come from the page's own origin
               or one given with --allow-origin (browsers always send Origin; other
               clients need not)
    token      with --token, every websocket and /api/... needs ?token=... or
               Authorization: Bearer; the page itself is public
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import ssl
from urllib.parse import urlsplit

from aiohttp import web

from .admission import Limits
from .errors import UserError

def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hostname(netloc: str) -> str:
    return (urlsplit(f"//{netloc}").hostname or "").lower()


class Gate:
    def __init__(self, limits: Limits, host: str, allow_origins: tuple[str, ...] = (), token: str | None = None):
        self.limits, self.token = limits, token
        self.loopback = is_loopback(host)
        self.origins = {o.rstrip("/").lower() for o in allow_origins}
        self.hosts = {urlsplit(o).hostname for o in self.origins} - {None}
        self.accepting: set = set()  # sockets accepted, not yet connected (TLS handshake)
        self.open: set = set()
        self.in_session: set = set()
        self.refused = 0

    # -- sockets

    def handshakes(self) -> int:
        return len(self.accepting) + len(self.open - self.in_session)

    def factory(self, server: web.Server):
        loop = asyncio.get_running_loop()
        lim = self.limits

        def make():
            if (len(self.accepting) + len(self.open) >= lim.max_connections
                    or self.handshakes() >= lim.max_handshakes):
                self.refused += 1
                return _Refusal(f"the server is busy ({len(self.open)} connections, {self.handshakes()} "
                                f"not in a session); try again later", lim.handshake_timeout_s)
            conn = _Connection(server, loop=loop, keepalive_timeout=lim.handshake_timeout_s, access_log=None)
            conn.gate = self
            self.accepting.add(conn)
            loop.call_later(lim.handshake_timeout_s + 1.0, self.accepting.discard, conn)
            return conn

        return make

    def admitted(self, request: web.Request) -> None:
        """The request's socket holds a session (or a reserved slot): not a handshake."""
        if request.protocol in self.open:
            self.in_session.add(request.protocol)

    # -- requests

    def refusal(self, request: web.Request) -> tuple[int, str] | None:
        """(HTTP status, one line) for a request that may not pass, else None."""
        host = request.headers.get("Host")  # a client without one is no browser
        if self.loopback and host is not None and not (is_loopback(_hostname(host)) or _hostname(host) in self.hosts):
            return 403, (f"Host {host!r:.80} is not served here: this server listens on a "
                         "loopback address (use --allow-origin for a name that reaches it)")
        origin = request.headers.get("Origin")
        socket = request.headers.get("Upgrade", "").lower() == "websocket"
        if socket and origin is not None and not self._origin_allowed(origin, request):
            return 403, (f"origin {origin!r:.80} may not open sessions on this server; "
                         "start it with --allow-origin for that page")
        if self.token and (socket or request.path.startswith("/api/")) and not self._token_ok(request):
            return 401, "this server needs its token: open the page as /?token=..."
        return None

    def _origin_allowed(self, origin: str, request: web.Request) -> bool:
        origin = origin.rstrip("/").lower()
        own = f"{request.scheme}://{request.headers.get('Host', '')}".lower()
        return origin == own or origin in self.origins

    def _token_ok(self, request: web.Request) -> bool:
        given = request.query.get("token", "")
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given = auth[len("Bearer "):]
        return hmac.compare_digest(given.encode(), self.token.encode())

    def middleware(self, log):
        @web.middleware
        async def guard(request, handler):
            refused = self.refusal(request)
            if refused is not None:
                log(f"refused {request.method} {request.path} from {request.remote}: {refused[1]}")
                return web.Response(status=refused[0], text=refused[1] + "\n")
            return await handler(request)

        return guard


class _Connection(web.RequestHandler):
    """aiohttp's HTTP protocol, counted by the gate from connection to loss."""

    gate: Gate

    def connection_made(self, transport) -> None:
        self.gate.accepting.discard(self)
        self.gate.open.add(self)
        super().connection_made(transport)

    def connection_lost(self, exc) -> None:
        self.gate.open.discard(self)
        self.gate.in_session.discard(self)
        super().connection_lost(exc)


class _Refusal(asyncio.Protocol):
    """A socket past the caps: one 503 line once its request arrives, then closed."""

    def __init__(self, line: str, timeout_s: float):
        self.line, self.timeout_s, self.transport = line, timeout_s, None

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().call_later(self.timeout_s, transport.close)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        body = (self.line + "\n").encode()
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
                             b"Retry-After: 5\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        self.transport.close()


class GatedSite(web.BaseSite):
    """A TCP site whose sockets go through the gate, optionally over TLS."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, gate: Gate, ssl_context=None):
        super().__init__(runner, ssl_context=ssl_context, backlog=128)
        self.host, self.port, self.gate = host, port, gate

    @property
    def name(self) -> str:
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        tls = dict(ssl=self._ssl_context, ssl_handshake_timeout=self.gate.limits.handshake_timeout_s) \
            if self._ssl_context else {}
        self._server = await loop.create_server(self.gate.factory(self._runner.server), self.host, self.port,
                                                backlog=self._backlog, reuse_address=True, **tls)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert and not key:
        return None
    if not (cert and key):
        raise UserError("--ssl-cert and --ssl-key go together: give both, or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UserError(f"--ssl-cert {cert} / --ssl-key {key}: cannot load them "
                        f"({getattr(e, 'strerror', None) or getattr(e, 'reason', None) or e})") from None
    return ctx
