"""A client that leaves has its generation aborted and its KV blocks freed, streaming or not."""
from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families


def sample_value(server, sample_name: str, **labels) -> float:
    for family in text_string_to_metric_families(server.metrics_text()):
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise KeyError(sample_name)


def aborted(server) -> float:
    return sample_value(server, "vllm:request_success_total", finished_reason="abort")


def engine_idle(server) -> bool:
    return (sample_value(server, "vllm:num_requests_running") == 0
            and sample_value(server, "vllm:num_requests_waiting") == 0
            and sample_value(server, "vllm:kv_cache_usage_perc") == 0)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streaming_client_disconnect_aborts(server, slow_steps, chat):
    slow_steps(server.engine, 0.02)  # 200 tokens would take over 4 s: a finish cannot pass for an abort
    before = aborted(server)
    client = server.client()
    options = dict(model=server.model, max_tokens=200, stream=True, extra_body={"ignore_eos": True})
    if chat:
        stream = client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **options)
    else:
        stream = client.completions.create(prompt="hello world", **options)
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert sample_value(server, "vllm:num_requests_running") == 1
    assert sample_value(server, "vllm:kv_cache_usage_perc") > 0
    stream.close()
    server.wait_until(lambda: aborted(server) == before + 1 and engine_idle(server), timeout=3,
                      what="abort and freed KV cache")
    assert server.async_engine.num_unfinished == 0


def test_non_streaming_client_disconnect_aborts(server, slow_steps):
    slow_steps(server.engine, 0.02)
    before = aborted(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", timeout=httpx.Timeout(30, read=0.5),
                   json={"prompt": "hello world", "max_tokens": 200, "ignore_eos": True})
    server.wait_until(lambda: aborted(server) == before + 1 and engine_idle(server), timeout=3,
                      what="abort and freed KV cache")
    assert server.async_engine.num_unfinished == 0
