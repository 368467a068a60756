"""Which depth tier serves a request at the gateway.

By default the shallowest tier at or above the request's depth (never shallower than asked).
Under `--depth-policy load` a request whose depth came from its quality (not named by it) may go
deeper: to the deepest tier at or above its floor that is not queueing, read from each tier's own
`/metrics` (`vllm:num_requests_waiting`, every QUEUE_INTERVAL_S); when all of them queue, to the
least queued (the shallowest on ties). So the share of requests on a shallower tier rises while
the deeper one queues and falls back as it drains, and no request goes below its floor.
"""
from __future__ import annotations

import asyncio

import httpx

from adadepth.outputs import DepthDecision
from adadepth.server.backend_map import Backend, BackendMap

QUEUE_INTERVAL_S = 0.5
PROBE_TIMEOUT_S = 5.0


class TierSelector:
    def __init__(self, backends: BackendMap, load_aware: bool, curve: dict[int, float] | None = None):
        """curve: mean agreement per depth (the gateway's `quality` curve), for the agreement a
        deeper tier gives; None: not reported."""
        self.backends = backends
        self.load_aware = load_aware
        self.curve = curve or {}
        self.waiting: dict[int, float | None] = {b.depth: None for b in backends.backends}

    async def read_queues(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self._read_queue(client, b) for b in self.backends.backends))

    async def _read_queue(self, client: httpx.AsyncClient, backend: Backend) -> None:
        try:
            response = await client.get(backend.url + "/metrics", timeout=PROBE_TIMEOUT_S)
            response.raise_for_status()
            self.waiting[backend.depth] = waiting_requests(response.text)
        except httpx.HTTPError:
            self.waiting[backend.depth] = None  # unknown: not a candidate for going deeper

    def pick(self, decision: DepthDecision) -> tuple[Backend, DepthDecision]:
        """The tier for a decided depth, and the decision as it will be reported."""
        floor = self.backends.tier_for(decision.depth)
        if not self.load_aware or decision.source == "request":
            return floor, decision
        known = [(self.waiting[b.depth], b) for b in self.backends.backends
                 if b.depth >= floor.depth and self.waiting[b.depth] is not None]
        if not known:
            return floor, decision
        idle = [b for waiting, b in known if waiting == 0]
        chosen = idle[-1] if idle else min(known, key=lambda wb: (wb[0], wb[1].depth))[1]
        if chosen.depth == floor.depth:
            return floor, decision
        return chosen, DepthDecision(chosen.depth, decision.num_layers, "load", decision.quality,
                                     self.curve.get(chosen.depth))


def waiting_requests(metrics_text: str) -> float:
    """Sum of the `vllm:num_requests_waiting` samples of a Prometheus text page (0 when absent)."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(("vllm:num_requests_waiting{", "vllm:num_requests_waiting ")):
            try:
                total += float(line.rsplit(" ", 1)[1])
            except ValueError:
                continue
    return total
