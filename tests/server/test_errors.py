"""Bad input is a 400 with OpenAI's error body; auth is 401; a full queue is 429; bugs are a
JSON 500 and the server keeps serving; a dead engine is 503."""
from __future__ import annotations

import logging
import re
import socket
import threading
import time

import httpx
import openai
import pytest

from adadepth.engine.llm_engine import LLMEngine
from adadepth.server.completion_serving import CompletionServing
from adadepth.server.config import ServerConfig
from conftest import STRICT_API_KEY, engine_config, start_server

OK_PROMPT = {"prompt": "hello", "max_tokens": 2}
OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

COMPLETION_ERRORS = [
    ("malformed json", "{not json"),
    ("empty body", ""),
    ("body not an object", "[1, 2]"),
    ("missing prompt", {"max_tokens": 3}),
    ("prompt wrong type", {"prompt": 5}),
    ("prompt mixed list", {"prompt": ["a", 1]}),
    ("prompt empty list", {"prompt": []}),
    ("prompt empty string", {"prompt": ""}),
    ("prompt ids out of vocabulary", {"prompt": [1, 10**6]}),
    ("max_tokens string", {**OK_PROMPT, "max_tokens": "5"}),
    ("max_tokens bool", {**OK_PROMPT, "max_tokens": True}),
    ("max_tokens zero", {**OK_PROMPT, "max_tokens": 0}),
    ("max_tokens negative", {**OK_PROMPT, "max_tokens": -3}),
    ("longer than the context", {**OK_PROMPT, "max_tokens": 256}),
    ("temperature string", {**OK_PROMPT, "temperature": "hot"}),
    ("temperature negative", {**OK_PROMPT, "temperature": -1}),
    # Python's json reads NaN and Infinity; they are not temperatures.
    ("temperature NaN", '{"prompt": "hello", "max_tokens": 2, "temperature": NaN}'),
    ("temperature Infinity", '{"prompt": "hello", "max_tokens": 2, "temperature": Infinity}'),
    ("seed above 64 bits", {**OK_PROMPT, "seed": 2**64}),
    ("seed below 64 bits", {**OK_PROMPT, "seed": -(2**63) - 1}),
    ("top_p zero", {**OK_PROMPT, "top_p": 0}),
    ("top_k invalid", {**OK_PROMPT, "top_k": -5}),
    ("n zero", {**OK_PROMPT, "n": 0}),
    ("n float", {**OK_PROMPT, "n": 1.5}),
    ("logprobs bool", {**OK_PROMPT, "logprobs": True}),
    ("logprobs too many", {**OK_PROMPT, "logprobs": 21}),
    ("min_tokens above max_tokens", {**OK_PROMPT, "min_tokens": 5}),
    ("stop wrong type", {**OK_PROMPT, "stop": 5}),
    ("stop empty string", {**OK_PROMPT, "stop": [""]}),
    ("stop_token_ids outside the vocabulary", {**OK_PROMPT, "stop_token_ids": [10**6], "min_tokens": 1}),
    ("stop_token_ids negative", {**OK_PROMPT, "stop_token_ids": [-1]}),
    ("stop_token_ids beyond 64 bits", {**OK_PROMPT, "stop_token_ids": [10**20], "min_tokens": 1}),
    ("stream wrong type", {**OK_PROMPT, "stream": "yes"}),
    ("stream_options without stream", {**OK_PROMPT, "stream_options": {"include_usage": True}}),
    ("unknown model", {**OK_PROMPT, "model": "gpt-4"}),
    ("depth zero", {**OK_PROMPT, "depth": 0}),
    ("depth above layers", {**OK_PROMPT, "depth": 7}),
    ("depth fraction above one", {**OK_PROMPT, "depth": 1.5}),
    ("depth negative fraction", {**OK_PROMPT, "depth": -0.5}),
    ("depth string", {**OK_PROMPT, "depth": "half"}),
    ("quality zero", {**OK_PROMPT, "quality": 0}),
    ("quality above one", {**OK_PROMPT, "quality": 1.5}),
    ("presence_penalty out of range", {**OK_PROMPT, "presence_penalty": 2.5}),
    ("frequency_penalty out of range", {**OK_PROMPT, "frequency_penalty": -2.5}),
    ("repetition_penalty zero", {**OK_PROMPT, "repetition_penalty": 0}),
    ("min_p above one", {**OK_PROMPT, "min_p": 1.5}),
    ("logit_bias key not a token id", {**OK_PROMPT, "logit_bias": {"hello": 1}}),
    ("logit_bias token outside the vocabulary", {**OK_PROMPT, "logit_bias": {"99999": 1}}),
    ("logit_bias value out of range", {**OK_PROMPT, "logit_bias": {"5": 150}}),
    ("invalid json schema", {**OK_PROMPT, "structured_outputs": {"json": {"type": "nonsense"}}}),
    ("invalid regex", {**OK_PROMPT, "structured_outputs": {"regex": "(("}}),
    ("two constraints", {**OK_PROMPT, "structured_outputs": {"regex": "a", "choice": ["a"]}}),
    ("no constraint", {**OK_PROMPT, "structured_outputs": {}}),
    ("empty choice", {**OK_PROMPT, "structured_outputs": {"choice": []}}),
    ("structural tag", {**OK_PROMPT, "structured_outputs": {"structural_tag": "{}"}}),
    ("whitespace pattern", {**OK_PROMPT, "structured_outputs": {"json_object": True, "whitespace_pattern": " "}}),
    ("echo with logprobs", {**OK_PROMPT, "echo": True, "logprobs": 1}),
    # vLLM knobs this server does not implement: refused, not silently ignored.
    ("allowed_token_ids", {**OK_PROMPT, "allowed_token_ids": [1, 2]}),
    ("bad_words", {**OK_PROMPT, "bad_words": ["x"]}),
    ("guided_json", {**OK_PROMPT, "guided_json": {"type": "object"}}),
    ("beam search", {**OK_PROMPT, "use_beam_search": True}),
    ("include_stop_str_in_output", {**OK_PROMPT, "include_stop_str_in_output": True}),
    ("prompt_logprobs", {**OK_PROMPT, "prompt_logprobs": 1}),
    ("truncate_prompt_tokens", {**OK_PROMPT, "truncate_prompt_tokens": 5}),
]

CHAT_ERRORS = [
    ("missing messages", {"max_tokens": 2}),
    ("messages not a list", {"messages": "hi"}),
    ("messages empty", {"messages": []}),
    ("unknown role", {"messages": [{"role": "robot", "content": "hi"}]}),
    ("missing role", {"messages": [{"content": "hi"}]}),
    ("content wrong type", {"messages": [{"role": "user", "content": 5}]}),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}),
    ("text part without text", {"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("max_completion_tokens zero", {**OK_CHAT, "max_completion_tokens": 0}),
    ("longer than the context", {**OK_CHAT, "max_tokens": 250}),
    ("top_logprobs without logprobs", {**OK_CHAT, "top_logprobs": 2}),
    ("top_logprobs too many", {**OK_CHAT, "logprobs": True, "top_logprobs": 21}),
    ("unknown model", {**OK_CHAT, "model": "nope"}),
    ("depth above layers", {**OK_CHAT, "depth": 99}),
    ("quality negative", {**OK_CHAT, "quality": -0.1}),
    ("n zero", {**OK_CHAT, "n": 0}),
    ("tools", {**OK_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ("unknown response_format", {**OK_CHAT, "response_format": {"type": "yaml"}}),
    ("json_schema without schema", {**OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
    ("invalid schema", {**OK_CHAT, "response_format": {"type": "json_schema",
                                                       "json_schema": {"name": "x", "schema": {"type": 5}}}}),
    ("response_format and structured_outputs", {**OK_CHAT, "response_format": {"type": "json_object"},
                                                "structured_outputs": {"regex": "a"}}),
]


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def _post(http: httpx.Client, url: str, body) -> httpx.Response:
    if isinstance(body, str):
        return http.post(url, content=body, headers={"content-type": "application/json"})
    return http.post(url, json=body)


@pytest.mark.parametrize("body", [b for _, b in COMPLETION_ERRORS], ids=[n for n, _ in COMPLETION_ERRORS])
def test_bad_completion_requests_are_400(server, body):
    with server.http() as http:
        error = assert_openai_error(_post(http, "/v1/completions", body), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [b for _, b in CHAT_ERRORS], ids=[n for n, _ in CHAT_ERRORS])
def test_bad_chat_requests_are_400(server, body):
    with server.http() as http:
        assert_openai_error(_post(http, "/v1/chat/completions", body), 400)


def test_error_params_name_the_field(server):
    with server.http() as http:
        assert assert_openai_error(_post(http, "/v1/completions", {**OK_PROMPT, "max_tokens": 0}), 400)["param"] \
            == "max_tokens"
        assert assert_openai_error(_post(http, "/v1/completions", {**OK_PROMPT, "depth": "x"}), 400)["param"] == "depth"
        role = assert_openai_error(_post(http, "/v1/chat/completions",
                                         {"messages": [{"role": "robot", "content": "x"}]}), 400)
        assert role["param"] == "messages.0.role"
        nan = assert_openai_error(_post(http, "/v1/completions",
                                        '{"prompt": "hello", "max_tokens": 2, "temperature": NaN}'), 400)
        assert nan["param"] == "temperature"
        assert assert_openai_error(_post(http, "/v1/completions", {**OK_PROMPT, "seed": 2**64}), 400)["param"] == "seed"
        assert assert_openai_error(_post(http, "/v1/completions", {**OK_PROMPT, "prompt": ""}), 400)["param"] == "prompt"
        top = assert_openai_error(_post(http, "/v1/chat/completions", {**OK_CHAT, "logprobs": True, "top_logprobs": -1}),
                                  400)
        assert top["param"] == "top_logprobs"
        stops = assert_openai_error(_post(http, "/v1/completions", {**OK_PROMPT, "stop_token_ids": [-1]}), 400)
        assert stops["param"] == "stop_token_ids"
        image = assert_openai_error(_post(http, "/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400)
        assert "image_url" in image["message"] and image["param"] == "messages.0.content.1"
        model = assert_openai_error(_post(http, "/v1/completions", {**OK_PROMPT, "model": "x"}), 400)
        assert model["param"] == "model" and model["code"] == "model_not_found"


def test_openai_client_sees_bad_request(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="not-a-model", prompt="hi", max_tokens=2)
    assert info.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert client.completions.create(model=server.model, prompt="hi", max_tokens=2).choices  # still serving


def test_tokenize_errors_and_unknown_routes(server):
    with server.http() as http:
        assert_openai_error(_post(http, "/tokenize", {}), 400)
        assert_openai_error(_post(http, "/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
                            400)
        assert_openai_error(_post(http, "/detokenize", {"tokens": [10**7]}), 400)
        assert_openai_error(_post(http, "/detokenize", {"tokens": "abc"}), 400)
        assert_openai_error(http.get("/v1/nothing-here"), 404)
        assert_openai_error(http.get("/v1/completions"), 405)


def test_internal_error_is_json_500_and_the_server_keeps_serving(server, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug at /secret/path")

    monkeypatch.setattr(CompletionServing, "_response", broken)
    with server.http() as http:
        error = assert_openai_error(_post(http, "/v1/completions", OK_PROMPT), 500)
        # Generic text and an id for the client; the exception only in the log, under that id.
        assert "secret" not in error["message"] and "RuntimeError" not in error["message"]
        error_id = re.search(r"err-[0-9a-f]{16}", error["message"]).group()
        assert any(error_id in r.getMessage() and "a bug" in r.exc_text for r in caplog.records if r.exc_text)
        monkeypatch.undo()
        assert _post(http, "/v1/completions", OK_PROMPT).status_code == 200
    assert server.async_engine.num_unfinished == 0


def test_unsupported_vllm_fields_at_their_no_op_values_are_accepted(server):
    no_ops = {"use_beam_search": False, "length_penalty": 1.0, "bad_words": [], "include_stop_str_in_output": False,
              "allowed_token_ids": None, "guided_json": None}
    with server.http() as http:
        assert _post(http, "/v1/completions", {**OK_PROMPT, **no_ops}).status_code == 200
        guided = assert_openai_error(_post(http, "/v1/chat/completions", {**OK_CHAT, "guided_regex": "a+"}), 400)
        assert guided["param"] == "guided_regex" and "structured_outputs" in guided["message"]


def test_values_past_64_bits_do_not_reach_the_engine(server):
    """Integers JSON allows but int64 does not: refused or normalised before the engine, which would
    fail its step on them (and take every running request with it)."""
    with server.http() as http:
        assert _post(http, "/v1/completions", {**OK_PROMPT, "top_k": 10**20, "temperature": 1.0}).status_code == 200
        assert _post(http, "/v1/completions", {**OK_PROMPT, "stop_token_ids": [10**20]}).status_code == 400
        assert _post(http, "/v1/completions", {**OK_PROMPT, "logit_bias": {str(10**20): 1}}).status_code == 400
        assert _post(http, "/v1/completions", {"prompt": [10**20], "max_tokens": 2}).status_code == 400
        assert _post(http, "/v1/completions", OK_PROMPT).status_code == 200
    assert server.async_engine.is_healthy


def test_structured_output_constraints_are_bounded(server):
    """Compiling a constraint takes the server's CPU (faster than linearly in its choices): its size
    is refused before any compiling."""
    with server.http() as http:
        choices = assert_openai_error(_post(http, "/v1/completions", {
            **OK_PROMPT, "structured_outputs": {"choice": [str(i) for i in range(1025)]}}), 400)
        assert choices["param"] == "structured_outputs.choice" and "--max-structured-output-choices" in choices["message"]
        regex = assert_openai_error(_post(http, "/v1/completions", {
            **OK_PROMPT, "structured_outputs": {"regex": "a" * 70_000}}), 400)
        assert regex["param"] == "structured_outputs"
        schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(3000)}}
        fmt = assert_openai_error(_post(http, "/v1/chat/completions", {
            **OK_CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}), 400)
        assert fmt["param"] == "response_format" and "--max-structured-output-chars" in fmt["message"]


def test_a_slow_grammar_compile_does_not_hold_up_other_requests(server, monkeypatch):
    """A constraint compiles on a thread of its own: a plain request arriving during a long compile
    is parsed, tokenized and answered meanwhile."""
    manager = server.async_engine.engine.structured_outputs()
    plain_done, compiling = threading.Event(), threading.Event()
    real_compile = type(manager).compile

    def slow_compile(self, params):
        compiling.set()
        plain_done.wait(30)  # until the plain request is answered (or, if it is held up, 30 s)
        return real_compile(self, params)

    monkeypatch.setattr(type(manager), "compile", slow_compile)
    results = {}

    def constrained():
        with server.http() as http:
            results["constrained"] = _post(http, "/v1/completions", {
                **OK_PROMPT, "structured_outputs": {"choice": ["yes", "no"]}}).status_code

    worker = threading.Thread(target=constrained)
    worker.start()
    assert compiling.wait(30)
    started = time.monotonic()
    with server.http() as http:
        assert _post(http, "/v1/chat/completions", OK_CHAT).status_code == 200
    waited = time.monotonic() - started
    plain_done.set()
    worker.join(60)
    assert waited < 25 and results["constrained"] == 200


def test_a_body_cut_short_is_not_an_internal_error(server, caplog):
    """A client that closes the connection halfway through its body is gone, not a server bug: no
    traceback, no 500, and the server keeps serving."""
    caplog.set_level(logging.INFO, logger="adadepth.server.errors")
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"hel")
        time.sleep(0.3)  # the server is reading the body when the client goes
    deadline = time.monotonic() + 10
    while not any("before sending the whole request body" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the server did not notice the client leaving"
        time.sleep(0.05)
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    with server.http() as http:
        assert _post(http, "/v1/completions", OK_PROMPT).status_code == 200


def test_api_key(strict_server):
    url = strict_server.base_url
    for path, body in (("/v1/completions", OK_PROMPT), ("/v1/chat/completions", OK_CHAT),
                       ("/tokenize", {"prompt": "hi"}), ("/detokenize", {"tokens": [1]})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": STRICT_API_KEY}):
            error = assert_openai_error(httpx.post(url + path, json=body, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        ok = httpx.post(url + path, json=body, headers={"Authorization": f"Bearer {STRICT_API_KEY}"}, timeout=60)
        assert ok.status_code == 200, ok.text
    assert_openai_error(httpx.get(url + "/v1/models"), 401)
    # Health and metrics stay open.
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert [m.id for m in strict_server.client().models.list().data] == [strict_server.model]


def test_full_queue_is_429(strict_server, slow_steps):
    """One sequence runs at a time and one may wait: with A running and B waiting, C gets 429."""
    server = strict_server
    slow_steps(server.engine, 0.02)
    client = server.client()
    a = client.completions.create(model=server.model, prompt="long one", max_tokens=200, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(a))  # A has its first token: running, no longer waiting
    b_result = {}
    b = threading.Thread(target=lambda: b_result.update(out=client.completions.create(
        model=server.model, prompt="short", max_tokens=2)))
    b.start()
    server.wait_until(lambda: server.async_engine.num_waiting == 1, what="B waiting")
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=server.model, prompt="third", max_tokens=2)
    assert info.value.status_code == 429
    body = httpx.post(server.base_url + "/v1/completions", json=OK_PROMPT,
                      headers={"Authorization": f"Bearer {STRICT_API_KEY}"})
    assert assert_openai_error(body, 429)["code"] == "queue_full"
    a.close()  # the client leaves: A is aborted, B runs
    b.join(60)
    assert b_result["out"].choices[0].finish_reason == "length"
    server.wait_until(lambda: server.async_engine.num_unfinished == 0, what="all requests done")
    assert client.completions.create(model=server.model, prompt="after", max_tokens=2).choices


def test_dead_engine_is_503_and_unhealthy(tiny_llama, cache_dir):
    engine = LLMEngine(engine_config(tiny_llama, cache_dir))
    running = start_server(engine, ServerConfig(api_key=None))
    try:
        def crash():
            raise RuntimeError("device lost")

        engine.step = crash
        with running.http() as http:
            assert http.get("/health").status_code == 200
            assert_openai_error(_post(http, "/v1/completions", OK_PROMPT), 503)
            assert_openai_error(http.get("/health"), 503)
            assert_openai_error(_post(http, "/v1/chat/completions", OK_CHAT), 503)
            # Once dead, streaming requests are refused before any event is sent.
            assert_openai_error(_post(http, "/v1/completions", {**OK_PROMPT, "stream": True}), 503)
            assert http.get("/metrics").status_code == 200
    finally:
        running.stop()
