"""Limits, templates, timeouts, drain and engine faults, on a live server with the tiny model."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from adadepth.engine.llm_engine import LLMEngine
from adadepth.server.config import ServerConfig
from conftest import engine_config, start_server

PROMPT = {"prompt": "hello world", "max_tokens": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.fixture(scope="module")
def limited(tiny_llama, cache_dir):
    config = ServerConfig(api_key=None, max_request_bytes=20_000, max_n=3, max_prompts_per_request=4,
                          max_stop_strings=2, max_stop_string_chars=8, max_messages=3, max_logprobs=2,
                          max_logit_bias=2, max_waiting=8)
    running = start_server(LLMEngine(engine_config(tiny_llama, cache_dir)), config)
    yield running
    running.stop()


@pytest.mark.parametrize("url, body, param", [
    ("/v1/completions", {**PROMPT, "n": 4}, "n"),
    ("/v1/completions", {**PROMPT, "prompt": ["a"] * 5}, "prompt"),
    ("/v1/completions", {**PROMPT, "stop": ["a", "b", "c"]}, "stop"),
    ("/v1/completions", {**PROMPT, "stop": "123456789"}, "stop"),
    ("/v1/completions", {**PROMPT, "stop_token_ids": [1, 2, 3]}, "stop_token_ids"),
    ("/v1/completions", {**PROMPT, "logprobs": 3}, "logprobs"),
    ("/v1/completions", {**PROMPT, "logit_bias": {"1": 1, "2": 1, "3": 1}}, "logit_bias"),
    ("/v1/completions", {**PROMPT, "max_tokens": 300}, "prompt"),
    ("/v1/completions", {**PROMPT, "prompt": ["a", "b", "c"], "n": 3}, None),  # 9 sequences > --max-waiting 8
    ("/v1/chat/completions", {**CHAT, "messages": CHAT["messages"] * 4}, "messages"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ("/tokenize", {"messages": CHAT["messages"] * 4}, "messages"),
])
def test_each_limit_is_a_400_naming_its_field(limited, url, body, param):
    with limited.http() as http:
        error = error_of(http.post(url, json=body), 400)
    assert error["param"] == param
    assert "--max" in error["message"] or "context length" in error["message"]


def test_body_size_is_a_413_with_or_without_content_length(limited):
    big = json.dumps({**PROMPT, "prompt": "x" * 30_000}).encode()
    with limited.http() as http:
        assert error_of(http.post("/v1/completions", content=big,
                                  headers={"content-type": "application/json"}), 413)["code"] == "request_too_large"

        def chunks():  # no Content-Length: chunked transfer
            for i in range(0, len(big), 4096):
                yield big[i: i + 4096]

        assert error_of(http.post("/v1/completions", content=chunks(),
                                  headers={"content-type": "application/json"}), 413)["code"] == "request_too_large"
        assert http.post("/v1/completions", json=PROMPT).status_code == 200


def test_queue_counts_sequences_and_answers_429_with_retry_after(limited, slow_steps):
    """--max-waiting 8: one request of 3 x 2 sequences waits; a second of 3 x 1 would make 9."""
    slow_steps(limited.engine, 0.3)
    results = {}

    def first():
        with limited.http() as http:
            results["first"] = http.post("/v1/completions", json={**PROMPT, "prompt": ["a", "b", "c"], "n": 2})

    thread = threading.Thread(target=first)
    thread.start()
    limited.wait_until(lambda: limited.async_engine.num_waiting == 6, what="6 sequences waiting")
    with limited.http() as http:
        response = http.post("/v1/completions", json={**PROMPT, "prompt": ["a", "b", "c"]})
        error = error_of(response, 429)
        assert error["code"] == "queue_full" and response.headers["retry-after"] == "1"
        assert http.post("/v1/completions", json={**PROMPT, "prompt": ["a", "b"]}).status_code == 200
    thread.join(60)
    assert results["first"].status_code == 200 and len(results["first"].json()["choices"]) == 6


def test_request_chat_templates_are_refused_and_kwargs_allow_listed(limited):
    with limited.http() as http:
        own = {**CHAT, "chat_template": "{{ 'pwned' }}"}
        assert error_of(http.post("/v1/chat/completions", json=own), 400)["param"] == "chat_template"
        hidden = {**CHAT, "chat_template_kwargs": {"chat_template": "{{ 'pwned' }}"}}
        assert error_of(http.post("/v1/chat/completions", json=hidden), 400)["param"] == "chat_template"
        other = {**CHAT, "chat_template_kwargs": {"tokenize": True}}
        assert error_of(http.post("/v1/chat/completions", json=other), 400)["param"] == "chat_template_kwargs"
        allowed = {**CHAT, "chat_template_kwargs": {"enable_thinking": False}}
        assert http.post("/v1/chat/completions", json=allowed).status_code == 200


def test_a_trusting_server_renders_the_request_template(tiny_llama, cache_dir):
    running = start_server(LLMEngine(engine_config(tiny_llama, cache_dir)),
                           ServerConfig(api_key=None, trust_request_chat_template=True))
    try:
        with running.http() as http:
            body = {"messages": CHAT["messages"], "chat_template": "plain {{ messages[0]['content'] }}"}
            tokens = http.post("/tokenize", json={"prompt": "plain hi", "add_special_tokens": False}).json()["tokens"]
            out = http.post("/v1/chat/completions", json={**body, "max_tokens": 2}).json()
            assert out["usage"]["prompt_tokens"] == len(tokens)
    finally:
        running.stop()


def test_health_stays_fast_while_a_maximum_size_request_is_tokenized(tiny_llama, cache_dir):
    running = start_server(LLMEngine(engine_config(tiny_llama, cache_dir, max_model_len=512)),
                           ServerConfig(api_key=None))
    try:
        body = json.dumps({"prompt": "hello world " * 330_000, "max_tokens": 1}).encode()  # ~4 MB
        assert len(body) <= ServerConfig().max_request_bytes
        done = threading.Event()
        status = {}

        def post():
            with running.http() as http:
                status["code"] = http.post("/v1/completions", content=body,
                                           headers={"content-type": "application/json"}).status_code
            done.set()

        threading.Thread(target=post).start()
        worst = 0.0
        with running.http() as http:
            while not done.is_set():
                t0 = time.perf_counter()
                assert http.get("/health").status_code == 200
                worst = max(worst, time.perf_counter() - t0)
                time.sleep(0.02)
        assert status["code"] == 400  # far longer than the context
        assert worst < 0.1, f"/health took {worst * 1e3:.0f} ms during tokenization"
    finally:
        running.stop()


def test_request_timeout_aborts_and_frees_kv(tiny_llama, cache_dir, slow_steps):
    engine = LLMEngine(engine_config(tiny_llama, cache_dir))
    running = start_server(engine, ServerConfig(api_key=None, request_timeout=1.0))
    try:
        slow_steps(engine, 0.1)
        long = {**PROMPT, "max_tokens": 100, "ignore_eos": True}
        with running.http() as http:
            t0 = time.monotonic()
            error = error_of(http.post("/v1/completions", json=long), 408)
            assert error["code"] == "request_timeout" and time.monotonic() - t0 < 3
            with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as response:
                events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "request_timeout"
        running.wait_until(lambda: engine.block_manager.num_free_blocks == engine.block_manager.num_usable_blocks
                           and not engine.seqs, what="KV blocks freed")
    finally:
        running.stop()
