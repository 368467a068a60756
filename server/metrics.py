"""Prometheus metrics: vLLM's names, types, labels and buckets, plus adaptive-depth ones.

Dashboards and autoscalers built for vLLM (`vllm:time_to_first_token_seconds`, ...) read this
server unchanged; the bucket boundaries are those of vLLM v1 (`vllm/v1/metrics/loggers.py`).
The `adadepth:` metrics say how deep requests ran and what that bought.

Every server owns its `CollectorRegistry`, so several servers (tests) can live in one process.
The engine thread records; the HTTP handler for /metrics reads; prometheus_client is thread-safe.
"""
from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from adadepth.engine.llm_engine import EngineStats, StepInfo
from adadepth.outputs import RequestOutput

# vLLM v1 buckets.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                         20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
FINISH_REASONS = ("stop", "length", "abort")
AGREEMENT_BUCKETS = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0]
DEPTH_BUCKET_WIDTH = 0.1


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


def depth_bucket(depth: int, num_layers: int) -> str:
    """The label of the fraction of layers run, [lo, hi): half depth -> "0.5-0.6"; the last
    bucket also holds full depth -> "0.9-1.0"."""
    buckets = round(1 / DEPTH_BUCKET_WIDTH)
    # Round before floor so that 3/10 lands in "0.3-0.4", not "0.2-0.3" through float noise.
    lower = min(buckets - 1, math.floor(round(depth / num_layers * buckets, 9)))
    return f"{lower * DEPTH_BUCKET_WIDTH:.1f}-{(lower + 1) * DEPTH_BUCKET_WIDTH:.1f}"


class ServerMetrics:
    def __init__(self, model_name: str, num_layers: int, max_model_len: int,
                 registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        self.num_layers = num_layers
        labels = ["model_name", "engine"]
        values = (model_name, "0")  # one engine per server; vLLM labels its engine index too
        r = self.registry

        def gauge(name, doc):
            return Gauge(name, doc, labels, registry=r).labels(*values)

        def counter(name, doc):
            return Counter(name, doc, labels, registry=r).labels(*values)

        def histogram(name, doc, buckets):
            return Histogram(name, doc, labels, buckets=buckets, registry=r).labels(*values)

        # ---- vLLM: scheduler state -----------------------------------------------------
        self.num_running = gauge("vllm:num_requests_running", "Number of requests in model execution batches.")
        self.num_waiting = gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.")
        # ---- vLLM: counters ------------------------------------------------------------
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.prefix_cache_queries = counter("vllm:prefix_cache_queries",
                                            "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_cache_hits = counter("vllm:prefix_cache_hits",
                                         "Prefix cache hits, in terms of number of cached tokens.")
        self._prefix_seen = (0, 0)
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          labels + ["finished_reason"], registry=r)
        self.request_success = {reason: success.labels(*values, reason) for reason in FINISH_REASONS}
        # ---- vLLM: histograms ----------------------------------------------------------
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                                               token_buckets)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens",
                                                   "Number of generation tokens processed.", token_buckets)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             TOKEN_LATENCY_BUCKETS)
        self.tpot = histogram("vllm:request_time_per_output_token_seconds",
                              "Histogram of time_per_output_token_seconds per request.", TOKEN_LATENCY_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                             REQUEST_LATENCY_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds",
                                    "Histogram of time spent in WAITING phase for request.", REQUEST_LATENCY_BUCKETS)
        self.inference_time = histogram("vllm:request_inference_time_seconds",
                                        "Histogram of time spent in RUNNING phase for request.",
                                        REQUEST_LATENCY_BUCKETS)
        self.prefill_time = histogram("vllm:request_prefill_time_seconds",
                                      "Histogram of time spent in PREFILL phase for request.", REQUEST_LATENCY_BUCKETS)
        self.decode_time = histogram("vllm:request_decode_time_seconds",
                                     "Histogram of time spent in DECODE phase for request.", REQUEST_LATENCY_BUCKETS)
        # ---- adadepth --------------------------------------------------------------------
        self.request_depth = histogram("adadepth:request_depth", "Layers run per request.",
                                       list(range(1, num_layers + 1)))
        self.depth_source = Counter("adadepth:depth_decisions", "Requests by who chose their depth.",
                                    labels + ["source"], registry=r)
        self.layers_executed = counter("adadepth:layers_executed", "Token-layers computed (tokens x layers run).")
        self.layers_skipped = counter("adadepth:layers_skipped",
                                      "Token-layers skipped (tokens x layers not run) against full depth.")
        self.num_layers_gauge = gauge("adadepth:model_num_layers", "Layers of the served model.")
        self.num_layers_gauge.set(num_layers)
        self.depth_allowance = gauge("adadepth:depth_allowance",
                                     "--depth-policy load: the depth routed requests may get now "
                                     "(full depth when the policy is off).")
        self.depth_allowance.set(num_layers)
        self.depth_e2e = Histogram("adadepth:e2e_request_latency_seconds",
                                   "End-to-end request latency by fraction of layers run.",
                                   labels + ["depth_bucket"], buckets=REQUEST_LATENCY_BUCKETS, registry=r)
        self.depth_tpot = Histogram("adadepth:time_per_output_token_seconds",
                                    "Time per output token after the first, by fraction of layers run.",
                                    labels + ["depth_bucket"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.predicted_agreement = histogram("adadepth:predicted_agreement",
                                             "Router-predicted agreement with the full-depth model.",
                                             AGREEMENT_BUCKETS)
        self._values = values
        self._last_token_time: dict[str, float] = {}  # request id -> time of its newest token
        self._preemptions_seen = 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- recording (engine thread) ---------------------------------------------------
    def record_step(self, outputs: list[RequestOutput], step: StepInfo | None, stats: EngineStats,
                    num_preemptions: int) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_cache_usage.set(stats.kv_cache_usage)
        if stats.depth_allowance is not None:
            self.depth_allowance.set(stats.depth_allowance)
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        self.prefix_cache_queries.inc(queries - self._prefix_seen[0])
        self.prefix_cache_hits.inc(hits - self._prefix_seen[1])
        self._prefix_seen = (queries, hits)
        if num_preemptions > self._preemptions_seen:
            self.num_preemptions.inc(num_preemptions - self._preemptions_seen)
            self._preemptions_seen = num_preemptions
        if step is None:
            return
        # What sequences fed the model besides their newest token: prompts (whole or in chunks),
        # plus any outputs recomputed after a preemption.
        self.prompt_tokens.inc(step.num_prompt_tokens)
        self.generation_tokens.inc(len(outputs))  # every scheduled sequence samples one token
        self.layers_executed.inc(step.layers_executed)
        self.layers_skipped.inc(step.layers_skipped)
        for out in outputs:
            self._record_output(out)

    def _record_output(self, out: RequestOutput) -> None:
        m = out.metrics
        if m is None or m.last_token_time is None:
            return
        previous = self._last_token_time.get(out.request_id)
        if previous is None:
            if m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
        else:
            self.itl.observe(m.last_token_time - previous)
        self._last_token_time[out.request_id] = m.last_token_time
        if out.finished:
            self._record_finished(out)

    def _record_finished(self, out: RequestOutput) -> None:
        self._last_token_time.pop(out.request_id, None)
        m = out.metrics
        completion = out.outputs[0]
        num_out = completion.num_tokens
        reason = completion.finish_reason if completion.finish_reason in self.request_success else "stop"
        self.request_success[reason].inc()
        finished = m.finished_time if m.finished_time is not None else m.last_token_time
        e2e = finished - m.arrival_time
        self.e2e.observe(e2e)
        self.request_prompt_tokens.observe(len(out.prompt_token_ids))
        self.request_generation_tokens.observe(num_out)
        if m.first_scheduled_time is not None:
            self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
            self.inference_time.observe(m.last_token_time - m.first_scheduled_time)
            if m.first_token_time is not None:
                self.prefill_time.observe(m.first_token_time - m.first_scheduled_time)
        if m.first_token_time is not None:
            self.decode_time.observe(m.last_token_time - m.first_token_time)
        decision = out.depth_decision
        bucket = depth_bucket(decision.depth, self.num_layers)
        self.request_depth.observe(decision.depth)
        self.depth_source.labels(*self._values, decision.source).inc()
        self.depth_e2e.labels(*self._values, bucket).observe(e2e)
        if num_out > 1 and m.first_token_time is not None:
            tpot = (m.last_token_time - m.first_token_time) / (num_out - 1)
            self.tpot.observe(tpot)
            self.depth_tpot.labels(*self._values, bucket).observe(tpot)
        if decision.predicted_agreement is not None:
            self.predicted_agreement.observe(decision.predicted_agreement)

    def record_abort(self, request_id: str) -> None:
        self._last_token_time.pop(request_id, None)
        self.request_success["abort"].inc()
