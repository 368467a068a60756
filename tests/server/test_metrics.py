"""/metrics after traffic: vLLM's names, types, labels and buckets, and the adadepth metrics."""
from __future__ import annotations

import math

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from adadepth.server.metrics import (REQUEST_LATENCY_BUCKETS, TOKEN_LATENCY_BUCKETS, TTFT_BUCKETS, ServerMetrics,
                                     depth_bucket)

VLLM_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": TTFT_BUCKETS,
    "vllm:inter_token_latency_seconds": TOKEN_LATENCY_BUCKETS,
    "vllm:request_time_per_output_token_seconds": TOKEN_LATENCY_BUCKETS,
    "vllm:e2e_request_latency_seconds": REQUEST_LATENCY_BUCKETS,
    "vllm:request_queue_time_seconds": REQUEST_LATENCY_BUCKETS,
}
VLLM_GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
VLLM_COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success")


def families(server) -> dict:
    return {f.name: f for f in text_string_to_metric_families(server.metrics_text())}


def buckets(family, **labels) -> list[float]:
    return [float(s.labels["le"]) for s in family.samples
            if s.name.endswith("_bucket") and all(s.labels.get(k) == v for k, v in labels.items())]


def value(family, suffix: str = "", **labels) -> float:
    return sum(s.value for s in family.samples
               if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


def test_vllm_bucket_values_match_vllm_v1():
    # vllm/v1/metrics/loggers.py
    assert TTFT_BUCKETS[:8] == [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1] and TTFT_BUCKETS[-1] == 2560.0
    assert TOKEN_LATENCY_BUCKETS[0] == 0.01 and TOKEN_LATENCY_BUCKETS[-1] == 80.0 and len(TOKEN_LATENCY_BUCKETS) == 19
    assert REQUEST_LATENCY_BUCKETS[0] == 0.3 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0


def test_depth_bucket_labels():
    assert [depth_bucket(d, 6) for d in range(1, 7)] == ["0.1-0.2", "0.3-0.4", "0.5-0.6", "0.6-0.7", "0.8-0.9",
                                                         "0.9-1.0"]
    assert depth_bucket(3, 10) == "0.3-0.4" and depth_bucket(10, 10) == "0.9-1.0" and depth_bucket(1, 30) == "0.0-0.1"


def test_every_server_has_its_own_registry():
    a, b = ServerMetrics("m", 4, 128), ServerMetrics("m", 4, 128)  # the same names twice: no clash
    assert a.registry is not b.registry and isinstance(a.registry, CollectorRegistry)


def test_metrics_after_traffic(server):
    client = server.client()
    before = families(server)
    for depth in (3, 6):
        client.completions.create(model=server.model, prompt="hello world", max_tokens=5,
                                  extra_body={"ignore_eos": True, "depth": depth})
    list(client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4, stream=True, extra_body={"ignore_eos": True, "depth": 3}))
    after = families(server)
    label = {"model_name": server.model}

    for name, expected in VLLM_HISTOGRAMS.items():
        family = after[name]
        assert family.type == "histogram"
        assert buckets(family, **label) == expected + [math.inf], name
        assert value(family, "_count", **label) > 0, name
    for name in VLLM_GAUGES:
        assert after[name].type == "gauge"
        assert [s.labels["model_name"] for s in after[name].samples] == [server.model]
    for name in VLLM_COUNTERS:
        family = after[name]
        assert family.type == "counter"
        assert all(s.name in (name + "_total", name + "_created") for s in family.samples)
    assert value(after["vllm:generation_tokens"], "_total", **label) \
        >= value(before["vllm:generation_tokens"], "_total", **label) + 14
    assert value(after["vllm:prompt_tokens"], "_total", **label) > value(before["vllm:prompt_tokens"], "_total", **label)
    success = after["vllm:request_success"]
    assert {s.labels["finished_reason"] for s in success.samples} == {"stop", "length", "abort"}
    assert value(success, "_total", finished_reason="length") >= value(before["vllm:request_success"], "_total",
                                                                       finished_reason="length") + 3
    assert value(after["vllm:num_requests_running"], **label) == 0
    assert value(after["vllm:kv_cache_usage_perc"], **label) == 0

    depth = after["adadepth:request_depth"]
    assert depth.type == "histogram"
    assert buckets(depth, **label) == [1, 2, 3, 4, 5, 6, math.inf]
    grew = value(depth, "_bucket", le="3.0") - value(before["adadepth:request_depth"], "_bucket", le="3.0")
    assert grew >= 2  # the two depth-3 requests
    executed, skipped = after["adadepth:layers_executed"], after["adadepth:layers_skipped"]
    assert executed.type == skipped.type == "counter"
    assert value(skipped, "_total", **label) > value(before["adadepth:layers_skipped"], "_total", **label)
    assert value(executed, "_total", **label) > value(before["adadepth:layers_executed"], "_total", **label)
    e2e, tpot = after["adadepth:e2e_request_latency_seconds"], after["adadepth:time_per_output_token_seconds"]
    assert {s.labels["depth_bucket"] for s in e2e.samples} >= {"0.5-0.6", "0.9-1.0"}
    assert buckets(e2e, depth_bucket="0.5-0.6") == REQUEST_LATENCY_BUCKETS + [math.inf]
    assert buckets(tpot, depth_bucket="0.5-0.6") == TOKEN_LATENCY_BUCKETS + [math.inf]
    assert after["adadepth:predicted_agreement"].type == "histogram"


def test_layer_counters_are_per_token_layer(server):
    """A depth-2 request runs 2 of 6 layers for every token it feeds the model."""
    client = server.client()
    before = families(server)
    out = client.completions.create(model=server.model, prompt="hello world", max_tokens=5,
                                    extra_body={"ignore_eos": True, "depth": 2})
    after = families(server)
    executed, skipped = (value(after[name], "_total") - value(before[name], "_total")
                         for name in ("adadepth:layers_executed", "adadepth:layers_skipped"))
    assert skipped == 2 * executed
    # Tokens fed: the prompt, then every output but the last. (StepInfo may also count the token
    # sampled by the prefill step; that is the engine's accounting, passed through unchanged.)
    fed = out.usage.prompt_tokens + out.usage.completion_tokens - 1
    assert executed in (2 * fed, 2 * (fed + 1))
    assert value(after["vllm:prompt_tokens"], "_total") - value(before["vllm:prompt_tokens"], "_total") \
        == out.usage.prompt_tokens
    assert value(after["vllm:generation_tokens"], "_total") - value(before["vllm:generation_tokens"], "_total") \
        == out.usage.completion_tokens
