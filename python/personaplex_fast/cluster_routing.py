"""Where Ray Serve's proxies send a new conversation (a module of its own: the proxies
import it, and need nothing else of ours)."""

import random

from ray.serve.request_router import RequestRouter


class FewestFirst(RequestRouter):
    """Every replica is a candidate, in random order; Serve then takes their ongoing
    requests (from its cache, or probed) and sends the request to the least loaded one
    under its max_ongoing_requests, the first of equals. (The default, power of two
    choices, compares two random replicas: past two it can send a conversation to a full
    replica while another has a free slot.)"""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        return [random.sample(candidate_replicas, len(candidate_replicas))]
