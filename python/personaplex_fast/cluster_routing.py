"""What runs in Ray Serve's proxies, in front of the replicas (a module of its own: the
proxies import it, and need nothing else of ours): where a new conversation goes
(FewestFirst), and how much of a conversation's output may wait for its client
(BoundedSends)."""

import asyncio
import random
import socket
import sys
import time
from collections import Counter

from ray.serve.request_router import RequestRouter
from starlette.middleware import Middleware

# As server.py's OUTPUT_MESSAGES and SEND_BUFFER (a test checks): the messages that may wait
# for a client, and the kernel and transport send buffers of its socket.
OUTPUT_MESSAGES = 30
SEND_BUFFER = 32 * 1024
# A conversation that has ended has this long to hand its last messages to its client.
FLUSH_S = 2.0
# The scope key BoundedSends sets, which tells a replica that its sockets are bounded.
BOUNDED = "personaplex_fast.bounded_sends"
# Serve's hook for the proxies' middlewares: an environment variable where they run.
PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", f"{__name__}:proxy_middlewares")


class FewestFirst(RequestRouter):
    """Every replica is a candidate, least loaded first (random among equals); Serve takes
    the first under its max_ongoing_requests. (The default, power of two choices, compares
    two random replicas: past two it can send a conversation to a full replica while
    another has a free slot.)

    A replica's load is what this proxy has sent it and not seen finish, counted from the
    moment it is chosen. Serve's own counts (the replicas' answers, probes) lag behind a
    burst of conversations started at once, which then all see the same free replica, and
    a request that finishes before its answer is read leaves them one too high.
    """

    # A choice never confirmed by Serve (its request cancelled while routed) stops counting.
    CHOSEN_S = 10.0

    def initialize_state(self, **kwargs):
        # internal request id -> (replica id, when chosen, accepted by the replica)
        self.held: dict[str, tuple[object, float, bool]] = {}

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        now = time.monotonic()
        for request, (_, chosen, accepted) in list(self.held.items()):
            if not accepted and now - chosen > self.CHOSEN_S:
                del self.held[request]
        request = pending_request.metadata.internal_request_id if pending_request is not None else None
        self.held.pop(request, None)  # chosen again: its first choice was full
        load = Counter(replica for replica, _, _ in self.held.values())
        order = sorted(random.sample(candidate_replicas, len(candidate_replicas)), key=lambda r: load[r.replica_id])
        if request is not None and order:
            self.held[request] = (order[0].replica_id, now, False)
            pending_request.routing_context.should_backoff = True  # all were offered
        return [[r] for r in order]

    def on_request_routed(self, pending_request, replica_id, result) -> None:
        request = pending_request.metadata.internal_request_id
        if request in self.held:  # not when it has already finished
            self.held[request] = (replica_id, time.monotonic(), True)

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self.held.pop(internal_request_id, None)


class BoundedSends:
    """ASGI middleware of Serve's proxy: what `serve` does for a client that stops reading.

    A replica's messages reach the proxy through Ray without backpressure, and the proxy
    hands them to the client's socket one at a time, waiting while that socket's buffers
    are full. Left so, a client that stops reading keeps its connection and its slot while
    its output piles up in the kernel's send buffers (megabytes) and then in the proxy.
    Here the socket's buffers are capped as `serve` caps them, the messages wait in a
    queue of OUTPUT_MESSAGES (about 2 s of audio), and a client that lets the queue fill
    while its socket is full is disconnected: the replica hears it leave and frees its slot.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        transport = getattr(getattr(send, "__self__", None), "transport", None)  # uvicorn's protocol
        if scope["type"] != "websocket" or transport is None:
            return await self.app(scope, receive, send)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        transport.set_write_buffer_limits(high=SEND_BUFFER)
        queue: asyncio.Queue = asyncio.Queue(OUTPUT_MESSAGES)
        gone = asyncio.Event()

        async def write():
            try:
                while (message := await queue.get()) is not None:
                    await send(message)
            except (OSError, RuntimeError):  # uvicorn's ClientDisconnected: the replica hears it too
                pass
            finally:
                gone.set()

        async def bounded(message):
            while not gone.is_set():
                try:
                    return queue.put_nowait(message)
                except asyncio.QueueFull:
                    if not transport.get_write_buffer_size():
                        # The kernel takes more: a burst from the replica, which the writer
                        # hands over once it runs.
                        await asyncio.sleep(0)
                        continue
                    host, port = scope.get("client") or ("?", 0)
                    log(f"a client at {host}:{port} stopped reading, disconnecting it")
                    gone.set()
                    transport.abort()
            # Dropped once the client is gone, as a closed socket drops them.

        async def flush():
            await queue.put(None)
            await writer

        writer = asyncio.ensure_future(write())
        try:
            await self.app({**scope, BOUNDED: OUTPUT_MESSAGES}, receive, bounded)
            if not gone.is_set():
                try:  # the last messages (the close among them) leave, or the client is cut off
                    await asyncio.wait_for(flush(), FLUSH_S)
                except asyncio.TimeoutError:
                    transport.abort()
        finally:
            writer.cancel()


def proxy_middlewares() -> list:
    """Serve's proxy callback (PROXY_CALLBACK): the middlewares of every proxy."""
    return [Middleware(BoundedSends)]


def log(line: str) -> None:
    print(f"serve: {line}", file=sys.stderr, flush=True)
