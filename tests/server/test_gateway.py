"""The gateway (`adadepth serve --backend-map`): depth -> tier routing, request rewriting, streaming
relay, error pass-through and metrics, against stub OpenAI upstreams and real adadepth servers
serving `adadepth export` tiers."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from adadepth.cli import build_parser, main
from adadepth.cli_args import dataclass_from_args
from adadepth.engine.llm_engine import LLMEngine
from adadepth.export import ExportConfig, export_depth
from adadepth.model.depth_plan import DepthPlan
from adadepth.server.backend_map import BackendMap
from adadepth.server.config import API_KEY_ENV, ServerConfig
from adadepth.outputs import DepthDecision
from adadepth.server.depth_policy import DepthPolicy
from adadepth.server.gateway import Gateway, GatewayModel, build_gateway_app
from adadepth.server.lifecycle import DrainingServer
from conftest import engine_config, start_server
from tiny_model import build_tiny_checkpoint

ORDER = [3, 0, 5, 1, 4, 2]
GATE_TIMEOUT_S = 5.0


# ---- a stub OpenAI upstream ----------------------------------------------------------
@dataclass
class Stub:
    name: str
    requests: list[dict] = field(default_factory=list)   # {"path", "body", "headers"}
    sent_times: list[float] = field(default_factory=list)  # when each streamed event left the stub
    gate: threading.Semaphore = field(default_factory=lambda: threading.Semaphore(0))
    cancelled: threading.Event = field(default_factory=threading.Event)
    base_url: str = ""


def _completion(stub: Stub, body: dict, chat: bool) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": "hi there"}, "finish_reason": "length"}
              if chat else {"index": 0, "text": "hi there", "finish_reason": "length"})
    return {"id": "cmpl-stub", "object": "chat.completion" if chat else "text_completion", "created": 1,
            "model": body.get("model"), "choices": [choice],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}


def _chunks(body: dict, chat: bool) -> list[dict]:
    head = {"id": "cmpl-stub", "object": "chat.completion.chunk" if chat else "text_completion", "created": 1,
            "model": body.get("model")}
    pieces = ["a", "b\u2028", "c\u0085", "d"]  # characters vLLM sends raw and str.splitlines splits at
    out = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": "length" if last else None} if chat
                  else {"index": 0, "text": piece, "finish_reason": "length" if last else None})
        out.append({**head, "choices": [choice]})
    if (body.get("stream_options") or {}).get("include_usage"):
        out.append({**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}})
    return out


def _marker(body: dict) -> str:
    if "prompt" in body:
        return body["prompt"] if isinstance(body["prompt"], str) else ""
    return body["messages"][-1].get("content", "")


def stub_app(stub: Stub) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": stub.name, "object": "model"}]}

    async def create(request: Request, chat: bool):
        body = await request.json()
        stub.requests.append({"path": request.url.path, "body": body, "headers": dict(request.headers)})
        marker = _marker(body)
        if marker == "FAIL":  # vLLM's current error body
            return JSONResponse({"error": {"message": "stub refuses", "type": "BadRequestError", "param": "prompt",
                                           "code": 400}}, status_code=400)
        if marker == "FLAT":  # vLLM's older, flat error body
            return JSONResponse({"object": "error", "message": "too long", "type": "BadRequestError", "param": None,
                                 "code": 400}, status_code=422)
        if marker == "CRASH":
            return PlainTextResponse("Internal Server Error", status_code=500)
        if not body.get("stream"):
            return JSONResponse(_completion(stub, body, chat))
        gated = marker == "GATED"

        async def events():
            try:
                for i, chunk in enumerate(_chunks(body, chat)):
                    if gated and i > 0:  # the next chunk only once the client has the previous one
                        await asyncio.to_thread(stub.gate.acquire, True, GATE_TIMEOUT_S)
                    stub.sent_times.append(time.monotonic())
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
            except BaseException:
                stub.cancelled.set()
                raise

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await create(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await create(request, chat=True)

    return app


@contextlib.contextmanager
def serve_app(app):
    """`app` under uvicorn on a free port, in a thread; yields its base URL."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    lifecycle = getattr(app.state, "lifecycle", None)
    if lifecycle is None:  # a stub tier
        server = uvicorn.Server(config)
    else:  # the gateway: SIGTERM (handle_exit) drains, as in production
        server = DrainingServer(config, lifecycle)
        lifecycle.attach(server.stop, lambda: None)
    app.state.uvicorn_server = server
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@dataclass
class RunningGateway:
    base_url: str
    gateway: Gateway

    def http(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def client(self):
        from openai import OpenAI

        return OpenAI(base_url=self.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def metrics(self) -> dict:
        text = httpx.get(self.base_url + "/metrics", timeout=30).text
        return {f.name: f for f in text_string_to_metric_families(text)}

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.base_url + "/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not become healthy"
            time.sleep(0.02)


@contextlib.contextmanager
def running_gateway(model: GatewayModel, backend_map: dict | str, policy: DepthPolicy | None = None, **config):
    text = backend_map if isinstance(backend_map, str) else json.dumps(backend_map)
    server_config = ServerConfig(api_key=config.pop("api_key", None), backend_map=text, **config)
    gateway = Gateway(model, BackendMap.parse(text, model.num_layers), server_config, policy)
    with serve_app(build_gateway_app(gateway)) as url:
        yield RunningGateway(url, gateway)


def value(family, suffix: str = "", **labels) -> float:
    return sum(s.value for s in family.samples
               if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- fixtures ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    folder = build_tiny_checkpoint(str(tmp_path_factory.mktemp("gateway-model")), "llama", seed=11, weight_scale=4.0)
    DepthPlan(6, ORDER, source="test").save(folder)
    return folder


@pytest.fixture(scope="module")
def gateway_model(model_dir, cache_dir) -> GatewayModel:
    return GatewayModel.load(engine_config(model_dir, cache_dir, served_model_name="tiny-gw"))


@pytest.fixture(scope="module")
def stubs():
    """Three stub tiers at depths 2, 4 and 6."""
    with contextlib.ExitStack() as stack:
        made = {}
        for depth in (2, 4, 6):
            stub = Stub(f"stub-depth-{depth}")
            stub.base_url = stack.enter_context(serve_app(stub_app(stub)))
            made[depth] = stub
        yield made


@pytest.fixture(scope="module")
def gateway(gateway_model, stubs):
    with running_gateway(gateway_model, {str(d): s.base_url for d, s in stubs.items()}) as running:
        running.wait_healthy()
        yield running


def last_request(stub: Stub) -> dict:
    return stub.requests[-1]


# ---- the model without weights --------------------------------------------------------
def test_gateway_model_loads_config_tokenizer_and_order_only(gateway_model, model_dir):
    assert gateway_model.name == "tiny-gw" and model_dir in gateway_model.aliases
    assert gateway_model.num_layers == 6 and gateway_model.plan.layer_order == ORDER
    assert gateway_model.max_model_len == 256
    assert gateway_model.tokenizer.encode("hello world")


# ---- backend maps --------------------------------------------------------------------
def test_backend_map_forms_and_tier_choice(tmp_path):
    path = tmp_path / "backends.json"
    path.write_text(json.dumps({"4": "http://tier-4:8000/", "2": {"url": "https://tier-2/v1", "model": "m2"}}))
    for source in (str(path), path.read_text()):
        backends = BackendMap.parse(source, 6)
        assert backends.depths == [2, 4]
        assert [(b.url, b.model) for b in backends.backends] == [("https://tier-2", "m2"), ("http://tier-4:8000", None)]
    # Nearest tier at or above the depth; above every tier: the deepest.
    assert [backends.tier_for(d).depth for d in range(1, 7)] == [2, 2, 4, 4, 4, 4]


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('["http://a"]', "must be a JSON object"),
    ("{}", "it is empty"),
    ('{"abc": "http://a"}', "is not a depth"),
    ('{"2.5": "http://a"}', "is not a depth"),
    ('{"-1": "http://a"}', "is not a depth"),
    ('{"0": "http://a"}', "outside 1..6"),
    ('{"7": "http://a"}', "outside 1..6"),
    ('{"2": "ftp://a"}', "not an http(s) URL"),
    ('{"2": "tier-2:8000"}', "not an http(s) URL"),
    ('{"2": "http://"}', "not an http(s) URL"),
    ('{"2": "http://a:99999"}', "invalid port"),
    ('{"2": "http://a?x=1"}', "query or fragment"),
    ('{"2": 5}', "non-empty string"),
    ('{"2": {"model": "m"}}', "missing 'url'"),
    ('{"2": {"url": "http://a", "key": 1}}', "unknown keys"),
    ('{"2": {"url": "http://a", "model": ""}}', "'model' must be a non-empty string"),
    ('{"2": "http://a", "2": "http://b"}', "given twice"),
    ('{"2": "http://a", "02": "http://b"}', "given twice"),
])
def test_bad_backend_maps_are_rejected_clearly(text, message):
    with pytest.raises(ValueError, match="backend map") as exc:
        BackendMap.parse(text, 6)
    assert message in str(exc.value)


def test_backend_map_file_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a JSON object nor an existing file"):
        BackendMap.parse(str(tmp_path / "missing.json"), 6)


def test_serve_flag_selects_the_gateway(monkeypatch):
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = build_parser().parse_args(["serve", "--model", "m", "--backend-map", '{"3": "http://a"}'])
    assert dataclass_from_args(ServerConfig, args).backend_map == '{"3": "http://a"}'
    assert dataclass_from_args(ServerConfig, build_parser().parse_args(["serve"])).backend_map is None
    with pytest.raises(ValueError, match="backend_map"):
        ServerConfig(backend_map=" ")


# ---- routing and rewriting -----------------------------------------------------------
@pytest.mark.parametrize("extra, tier, requested, source", [
    ({"depth": 1}, 2, 1, "request"),
    ({"depth": 2}, 2, 2, "request"),
    ({"depth": 3}, 4, 3, "request"),
    ({"depth": 0.5}, 4, 3, "request"),
    ({"depth": 5}, 6, 5, "request"),
    ({}, 6, 6, "default"),
    ({"quality": 0.9}, 6, 6, "default"),  # no router yet: full depth, as the engine
])
def test_each_request_goes_to_the_nearest_tier_at_or_above(gateway, stubs, extra, tier, requested, source):
    body = {"model": "tiny-gw", "prompt": "hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "top_k": 5, **extra}
    with gateway.http() as http:
        out = http.post("/v1/completions", json=body)
    assert out.status_code == 200, out.text
    sent = last_request(stubs[tier])
    assert sent["path"] == "/v1/completions"
    # adadepth's fields are gone, the model is the tier's, everything else as the client sent it.
    assert sent["body"] == {"model": f"stub-depth-{tier}", "prompt": "hello", "max_tokens": 3, "temperature": 0,
                            "ignore_eos": True, "top_k": 5}
    payload = out.json()
    assert payload["choices"][0]["text"] == "hi there" and payload["usage"]["completion_tokens"] == 3
    assert payload["adadepth"] == {"depth": tier, "requested_depth": requested, "num_layers": 6, "source": source,
                                   "quality": extra.get("quality"), "predicted_agreement": None,
                                   "backend": stubs[tier].base_url}


def test_chat_is_routed_and_the_model_name_may_be_omitted(gateway, stubs):
    with gateway.http() as http:
        out = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "depth": 4,
                                                      "max_tokens": 2})
    assert out.status_code == 200
    sent = last_request(stubs[4])
    assert sent["path"] == "/v1/chat/completions" and sent["body"]["model"] == "stub-depth-4"
    assert "depth" not in sent["body"] and sent["body"]["messages"] == [{"role": "user", "content": "hi"}]
    assert out.json()["adadepth"]["depth"] == 4


def test_shallow_tiers_only_fall_back_to_the_deepest(gateway_model, stubs):
    with running_gateway(gateway_model, {"2": stubs[2].base_url, "4": stubs[4].base_url},
                         default_quality=0.8) as gw, gw.http() as http:
        report = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).json()["adadepth"]
    assert (report["depth"], report["requested_depth"], report["quality"]) == (4, 6, 0.8)
    assert "quality" not in last_request(stubs[4])["body"]


def test_map_model_names_are_used_without_discovery(gateway_model, stubs):
    backend_map = {"6": {"url": stubs[6].base_url + "/v1", "model": "named-in-map"}}
    with running_gateway(gateway_model, backend_map) as gw, gw.http() as http:
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 200
    assert last_request(stubs[6])["body"]["model"] == "named-in-map"


class PromptLengthPolicy(DepthPolicy):
    """A stand-in router: short prompts run shallow."""

    def __init__(self):
        self.seen: list = []

    def choose(self, prompt, params):
        self.seen.append(prompt)
        return DepthDecision(2 if len(prompt) < 20 else 5, 6, "router", params.quality, predicted_agreement=0.93)


def test_a_depth_policy_chooses_for_requests_without_depth(gateway_model, stubs):
    policy = PromptLengthPolicy()
    backend_map = {str(d): s.base_url for d, s in stubs.items()}
    with running_gateway(gateway_model, backend_map, policy, default_quality=0.9) as gw, gw.http() as http:
        report = http.post("/v1/completions", json={"prompt": "short"}).json()["adadepth"]
        assert (report["depth"], report["requested_depth"], report["source"], report["quality"],
                report["predicted_agreement"]) == (2, 2, "router", 0.9, 0.93)
        # Several prompts, one request: the deepest choice decides the tier.
        report = http.post("/v1/completions", json={"prompt": ["short", "a prompt that is rather long"],
                                                    "quality": 0.5}).json()["adadepth"]
        assert (report["depth"], report["requested_depth"], report["quality"]) == (6, 5, 0.5)
        # Chat: the policy reads the prompt the chat template renders.
        http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert policy.seen[-1] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        # An explicit depth is never second-guessed.
        seen = len(policy.seen)
        assert http.post("/v1/completions", json={"prompt": "short", "depth": 6}).json()["adadepth"]["source"] == "request"
        assert len(policy.seen) == seen
        agreement = gw.metrics()["adadepth:predicted_agreement"]
        assert value(agreement, "_count") == 3


# ---- streaming -----------------------------------------------------------------------
def _events(response: httpx.Response):
    # httpx splits lines as str.splitlines does (at U+2028 too): the gateway must escape what tiers send raw.
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line[len("data: "):]


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"prompt": "GATED"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "GATED"}]}),
])
def test_streams_pass_through_chunk_by_chunk(gateway, stubs, path, body):
    stub = stubs[4]
    stub.sent_times.clear()
    stub.gate = threading.Semaphore(0)
    received, events = [], []
    request = {**body, "model": "tiny-gw", "stream": True, "depth": 3, "max_tokens": 4}
    with gateway.http() as http, http.stream("POST", path, json=request) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for data in _events(response):
            received.append(time.monotonic())
            events.append(data)
            stub.gate.release()  # let the stub send its next chunk
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    # Each chunk reached the client before the stub sent the next one: nothing is buffered. (The
    # stub sent a fifth, the usage chunk, which the gateway asked for and kept.)
    assert len(chunks) == 4 and len(stub.sent_times) == 5
    assert all(got < sent for got, sent in zip(received, stub.sent_times[1:]))
    # The gateway asked for usage (for its metrics) but the client did not: the usage chunk stays here.
    sent = last_request(stub)["body"]
    assert sent["stream_options"] == {"include_usage": True} and "depth" not in sent
    assert all(c["choices"] for c in chunks)
    expected = _chunks({"model": "stub-depth-4"}, chat=path.endswith("chat/completions"))
    assert [{k: v for k, v in c.items() if k != "adadepth"} for c in chunks] == expected
    assert [("adadepth" in c) for c in chunks] == [False, False, False, True]  # on the finishing chunk
    assert chunks[-1]["adadepth"]["depth"] == 4 and chunks[-1]["adadepth"]["requested_depth"] == 3


def test_streamed_usage_is_forwarded_when_asked(gateway, stubs):
    request = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}, "depth": 6}
    with gateway.http() as http, http.stream("POST", "/v1/completions", json=request) as response:
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [line[len("data: "):] for line in raw.splitlines() if line.startswith("data: ")]
    usage = json.loads(events[-2])
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4 and usage["adadepth"]["depth"] == 6
    # Relayed verbatim: the stub's bytes for the chunks the gateway did not annotate.
    assert events[0] == json.dumps(_chunks({"model": "stub-depth-6"}, chat=False)[0])


def test_client_disconnect_closes_the_upstream_stream(gateway, stubs):
    stub = stubs[2]
    stub.cancelled.clear()
    stub.gate = threading.Semaphore(0)
    before = value(gateway.metrics()["vllm:request_success"], "_total", finished_reason="abort")
    with gateway.http() as http, http.stream("POST", "/v1/completions",
                                             json={"prompt": "GATED", "stream": True, "depth": 1}) as response:
        first = next(_events(response))
        assert json.loads(first)["choices"][0]["text"] == "a"
    assert stub.cancelled.wait(GATE_TIMEOUT_S + 5), "the stub's stream was not closed"
    deadline = time.monotonic() + 10
    while value(gateway.metrics()["vllm:request_success"], "_total", finished_reason="abort") < before + 1:
        assert time.monotonic() < deadline, "the abort was not counted"
        time.sleep(0.05)


# ---- errors --------------------------------------------------------------------------
def test_upstream_errors_pass_through(gateway):
    with gateway.http() as http:
        out = http.post("/v1/completions", json={"prompt": "FAIL", "depth": 2})
        assert out.status_code == 400
        assert out.json() == {"error": {"message": "stub refuses", "type": "BadRequestError", "param": "prompt",
                                        "code": 400}}
        out = http.post("/v1/completions", json={"prompt": "FLAT", "depth": 2})
        assert out.status_code == 422
        assert out.json() == {"error": {"message": "too long", "type": "BadRequestError", "param": None, "code": 400}}
        out = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "CRASH"}]})
        assert out.status_code == 500 and "Internal Server Error" in out.json()["error"]["message"]
        # A streaming request that fails before its first event gets the JSON error, not a stream.
        out = http.post("/v1/completions", json={"prompt": "FAIL", "stream": True})
        assert out.status_code == 400 and out.json()["error"]["message"] == "stub refuses"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "depth": 7}, "depth"),
    ({"prompt": "x", "depth": 0}, "depth"),
    ({"prompt": "x", "depth": 1.5}, "depth"),
    ({"prompt": "x", "depth": "half"}, "depth"),
    ({"prompt": "x", "quality": 0}, "quality"),
    ({"prompt": "x", "model": "gpt-4"}, "model"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
])
def test_gateway_refuses_what_the_engine_refuses(gateway, body, param):
    with gateway.http() as http:
        out = http.post("/v1/completions", json=body)
    assert out.status_code == 400 and out.json()["error"]["param"] == param


def test_bad_bodies_and_unreachable_backends(gateway_model):
    dead = closed_port_url()
    with running_gateway(gateway_model, {"6": {"url": dead, "model": "m"}}) as gw, gw.http() as http:
        assert http.post("/v1/completions", content=b"{nope").json()["error"]["code"] == "invalid_json"
        assert http.post("/v1/completions", content=b"[1]").status_code == 400
        for stream in (False, True):
            out = http.post("/v1/completions", json={"prompt": "x", "stream": stream})
            assert out.status_code == 502 and out.json()["error"]["code"] == "backend_unavailable"
        # No backend answers: the gateway reports itself unhealthy, naming the tiers.
        health = http.get("/health")
        assert health.status_code == 503 and dead in health.json()["error"]["message"]
    with running_gateway(gateway_model, {"6": dead}) as gw, gw.http() as http:  # model discovery fails too
        assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 502


# ---- API key, models, health, metrics ------------------------------------------------
def test_api_key_models_and_health(gateway_model, stubs):
    with running_gateway(gateway_model, {"4": stubs[4].base_url}, api_key="gw-key") as gw:
        gw.wait_healthy()  # /health needs no key
        with gw.http() as http:
            assert http.get("/v1/models").status_code == 401
            assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 401
        with gw.http("gw-key") as http:
            model = http.get("/v1/models").json()["data"][0]
            assert (model["id"], model["num_layers"], model["depth_tiers"], model["max_model_len"]) == \
                ("tiny-gw", 6, [4], 256)
            assert http.get("/v1/models/tiny-gw").json() == model
            missing = http.get("/v1/models/gpt-4")
            assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
            assert http.post("/v1/completions", json={"prompt": "x"}).status_code == 200
        assert "Authorization" not in last_request(stubs[4])["headers"]


def test_metrics_after_traffic(gateway, stubs):
    before = gateway.metrics()
    with gateway.http() as http:
        http.post("/v1/completions", json={"prompt": "x", "depth": 3})                 # 7 + 3 tokens, tier 4
        with http.stream("POST", "/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "x"}], "stream": True, "depth": 4}) as r:
            r.read()                                                                    # 5 + 4 tokens, tier 4
        http.post("/v1/completions", json={"prompt": "FAIL", "depth": 4})
    after = gateway.metrics()
    label = {"model_name": "tiny-gw"}

    def grew(name, suffix="_total", **labels):
        return value(after[name], suffix, **label, **labels) - value(before[name], suffix, **label, **labels)

    assert grew("vllm:prompt_tokens") == 12 and grew("vllm:generation_tokens") == 7
    assert grew("vllm:request_success", finished_reason="length") == 2
    assert grew("vllm:e2e_request_latency_seconds", "_count") == 2
    assert grew("vllm:time_to_first_token_seconds", "_count") == 1  # streamed requests only
    assert grew("vllm:inter_token_latency_seconds", "_count") == 3
    assert grew("vllm:request_time_per_output_token_seconds", "_count") == 1
    assert grew("vllm:request_prompt_tokens", "_count") == 2
    assert grew("adadepth:request_depth", "_bucket", le="4.0") - grew("adadepth:request_depth", "_bucket", le="3.0") == 2
    assert grew("adadepth:depth_decisions", source="request") == 2
    assert grew("adadepth:layers_executed") == (7 + 2) * 4 + (5 + 3) * 4
    assert grew("adadepth:gateway_tier_requests", tier_depth="4", status="200") == 2
    assert grew("adadepth:gateway_tier_requests", tier_depth="4", status="400") == 1
    assert value(after["vllm:num_requests_running"], **label) == 0
    assert after["adadepth:gateway_tier_requests"].type == "counter"


# ---- real adadepth servers as tiers ---------------------------------------------------
@pytest.fixture(scope="module")
def real_tiers(model_dir, cache_dir, tmp_path_factory):
    """The full model and its depth-3 export, each served by a real adadepth server."""
    export_dir = str(tmp_path_factory.mktemp("tiers") / "depth-3")
    export_depth(ExportConfig(model=model_dir, depth=3, cache_dir=cache_dir), export_dir)
    full = start_server(LLMEngine(engine_config(model_dir, cache_dir)), ServerConfig(api_key=None))
    tier3 = start_server(LLMEngine(engine_config(export_dir, cache_dir)), ServerConfig(api_key=None))
    yield full, tier3
    full.stop()
    tier3.stop()


def test_gateway_in_front_of_real_adadepth_tiers(gateway_model, real_tiers):
    full, tier3 = real_tiers
    with running_gateway(gateway_model, {"3": tier3.base_url, "6": full.base_url}) as gw:
        gw.wait_healthy()
        client, direct = gw.client(), full.client()
        greedy = dict(prompt="the quick brown fox", max_tokens=8, temperature=0)
        for depth, tier in ((2, 3), (3, 3), (5, 6)):
            via = client.completions.create(model="tiny-gw", **greedy, extra_body={"ignore_eos": True,
                                                                                   "depth": depth})
            # The tier answers what the full model answers at the tier's depth (exported exactly).
            ref = direct.completions.create(model=full.model, **greedy, extra_body={"ignore_eos": True,
                                                                                    "depth": tier})
            assert via.choices[0].text == ref.choices[0].text
            assert via.usage.completion_tokens == 8 and via.model == (tier3 if tier == 3 else full).model
            assert via.model_extra["adadepth"]["depth"] == tier
            assert via.model_extra["adadepth"]["requested_depth"] == depth
        messages = [{"role": "user", "content": "hello world"}]
        stream = client.chat.completions.create(model="tiny-gw", messages=messages, max_tokens=6, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True, "depth": 3})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        ref = direct.chat.completions.create(model=full.model, messages=messages, max_tokens=6, temperature=0,
                                             extra_body={"ignore_eos": True, "depth": 3})
        assert text == ref.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "length"
        assert chunks[-1].model_extra["adadepth"]["depth"] == 3
        metrics = gw.metrics()
        assert value(metrics["vllm:generation_tokens"], "_total") == 3 * 8 + 6  # from the tiers' usage


# ---- the command ---------------------------------------------------------------------
def test_adadepth_serve_gateway_command(model_dir, cache_dir, stubs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend_map = json.dumps({"2": stubs[2].base_url, "6": stubs[6].base_url})
    cmd = [sys.executable, "-m", "adadepth.cli", "serve", "--model", model_dir, "--cache-dir", cache_dir,
           "--host", "127.0.0.1", "--port", str(port), "--backend-map", backend_map, "--served-model-name", "gw-cli",
           "--uvicorn-log-level", "warning"]
    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the gateway did not come up"
            time.sleep(0.2)
        out = httpx.post(base + "/v1/completions", json={"model": "gw-cli", "prompt": "x", "depth": 1}, timeout=30)
        assert out.status_code == 200 and out.json()["adadepth"]["depth"] == 2
        assert last_request(stubs[2])["body"]["model"] == "stub-depth-2"
    finally:
        proc.terminate()
        proc.wait(30)
    # A bad map stops the command before it serves, with the reason.
    with pytest.raises(SystemExit, match="depth 9 is outside 1..6"):
        main(["serve", "--model", model_dir, "--cache-dir", cache_dir, "--backend-map", '{"9": "http://a"}'])


def test_gateway_drains_on_sigterm_like_the_server(gateway_model, stubs):
    """SIGTERM's path (the server's handle_exit): /health and new requests 503 at once, the stream
    in flight runs to its end, then the gateway stops."""
    import signal

    text = json.dumps({str(d): s.base_url for d, s in stubs.items()})
    config = ServerConfig(api_key=None, backend_map=text, shutdown_timeout=5)
    app = build_gateway_app(Gateway(gateway_model, BackendMap.parse(text, gateway_model.num_layers), config))
    with serve_app(app) as url:
        server = app.state.uvicorn_server
        RunningGateway(url, app.state.gateway).wait_healthy()
        # One stream held open by the tier (GATED: each next chunk waits for the gate): the drain waits.
        events: list[str] = []
        first = threading.Event()

        def hold() -> None:
            with httpx.stream("POST", url + "/v1/completions", timeout=30,
                              json={"prompt": "GATED", "stream": True, "depth": 1}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()

        holder = threading.Thread(target=hold)
        holder.start()
        assert first.wait(10)
        server.handle_exit(signal.SIGTERM, None)
        deadline = time.monotonic() + 2
        while httpx.get(url + "/health", timeout=5).status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        for stub in stubs.values():
            stub.gate.release(10)
        holder.join(30)
        assert events[-1] == "[DONE]"  # the stream in flight ran to its end
        deadline = time.monotonic() + 30
        while not server.should_exit:
            assert time.monotonic() < deadline, "the gateway did not stop after draining"
            time.sleep(0.05)
