"""The gateway's Prometheus metrics: the engine server's (`ServerMetrics`, vLLM names) recorded
from proxied requests, plus a per-tier request counter.

What a proxy can see: latency end to end, the time to the first streamed chunk (TTFT) and between
chunks, the token counts the backend reports in `usage`, and the depth each request was sent to.
Scheduler gauges: `vllm:num_requests_running` counts requests in flight through the gateway;
`vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` stay 0 here (each tier exports its own),
so a sum over a namespace is not inflated by the gateway.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import Counter

from adadepth.outputs import DepthDecision
from adadepth.server.metrics import ServerMetrics, depth_bucket


@dataclass
class ProxyTrace:
    """What one proxied request did, filled in as its response passes through."""
    arrival_time: float
    decision: DepthDecision
    tier_depth: int
    first_chunk_time: float | None = None
    last_chunk_time: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reasons: list[str] = field(default_factory=list)
    chunk_gaps: list[float] = field(default_factory=list)  # seconds between streamed chunks

    def on_chunk(self, now: float) -> None:
        """A streamed chunk carrying choices arrived."""
        if self.first_chunk_time is None:
            self.first_chunk_time = now
        else:
            self.chunk_gaps.append(now - self.last_chunk_time)
        self.last_chunk_time = now

    def take_usage(self, usage) -> None:
        if not isinstance(usage, dict):
            return
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int):
            self.prompt_tokens, self.completion_tokens = prompt, completion

    def take_finish_reasons(self, choices) -> None:
        for choice in choices if isinstance(choices, list) else []:
            reason = choice.get("finish_reason") if isinstance(choice, dict) else None
            if reason is not None:
                self.finish_reasons.append(reason)


class GatewayMetrics:
    def __init__(self, model_name: str, num_layers: int, max_model_len: int):
        self.server = ServerMetrics(model_name, num_layers, max_model_len)
        self.registry = self.server.registry
        self.num_layers = num_layers
        self._labels = (model_name, "0")
        self.tier_requests = Counter(
            "adadepth:gateway_tier_requests", "Requests the gateway sent to each depth tier, by HTTP status.",
            ["model_name", "engine", "tier_depth", "status"], registry=self.registry)

    def render(self) -> bytes:
        return self.server.render()

    # ---- recording (event loop) --------------------------------------------------------
    def request_started(self) -> None:
        self.server.num_running.inc()

    def request_ended(self) -> None:
        self.server.num_running.dec()

    def record_tier(self, tier_depth: int, status: int) -> None:
        self.tier_requests.labels(*self._labels, str(tier_depth), str(status)).inc()

    def record_abort(self) -> None:
        self.server.request_success["abort"].inc()

    def record_finished(self, trace: ProxyTrace, finished_time: float) -> None:
        """A request the backend answered in full (200, stream run to its end)."""
        m = self.server
        reason = trace.finish_reasons[0] if trace.finish_reasons else "stop"
        m.request_success[reason if reason in m.request_success else "stop"].inc()
        e2e = finished_time - trace.arrival_time
        m.e2e.observe(e2e)
        depth = trace.tier_depth
        bucket = depth_bucket(depth, self.num_layers)
        m.request_depth.observe(depth)
        m.depth_source.labels(*self._labels, trace.decision.source).inc()
        m.depth_e2e.labels(*self._labels, bucket).observe(e2e)
        if trace.decision.predicted_agreement is not None:
            m.predicted_agreement.observe(trace.decision.predicted_agreement)
        if trace.first_chunk_time is not None:
            m.ttft.observe(trace.first_chunk_time - trace.arrival_time)
        for gap in trace.chunk_gaps:
            m.itl.observe(gap)
        if trace.prompt_tokens is None:
            return  # the backend reported no usage: token counts unknown
        prompt, generated = trace.prompt_tokens, trace.completion_tokens
        m.prompt_tokens.inc(prompt)
        m.generation_tokens.inc(generated)
        m.request_prompt_tokens.observe(prompt)
        m.request_generation_tokens.observe(generated)
        # Tokens fed through the tier's layers: the prompt, then every output but the last.
        fed = prompt + max(generated - 1, 0)
        m.layers_executed.inc(fed * depth)
        m.layers_skipped.inc(fed * (self.num_layers - depth))
        if generated > 1 and trace.first_chunk_time is not None and trace.last_chunk_time is not None:
            tpot = (trace.last_chunk_time - trace.first_chunk_time) / (generated - 1)
            m.tpot.observe(tpot)
            m.depth_tpot.labels(*self._labels, bucket).observe(tpot)
