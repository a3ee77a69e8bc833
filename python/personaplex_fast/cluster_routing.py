"""Where Ray Serve's proxies send a new conversation (a module of its own: the proxies
import it, and need nothing else of ours)."""

import random
import time
from collections import Counter

from ray.serve.request_router import RequestRouter


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
