"""`adadepth serve --backend-map ...`: the gateway in front of depth tiers.

Each tier is a stock OpenAI server (vLLM) serving the model cut to one depth (`adadepth export`).
For every completions or chat request the gateway picks the depth the engine would (an explicit
`depth`; else `quality` / `--default-quality` through a `DepthPolicy`, full depth without a
router), sends the request to the shallowest tier at or above that depth (the deepest tier when
none is deep enough), and relays the answer:

  * `depth` and `quality` are removed (stock vLLM rejects unknown fields) and `model` becomes the
    name the tier serves (from the map, or its GET /v1/models);
  * streams pass through event by event, unchanged, except that the chunks carrying a
    finish_reason, and the usage chunk, gain the `adadepth` object that non-streaming responses
    get too: {"depth": tier, "requested_depth": d, "num_layers": L, "source", "quality",
    "predicted_agreement", "backend": url};
  * a streaming request that did not ask for usage is sent with `include_usage` so that the
    token metrics stay exact; the extra usage chunk is consumed here, not forwarded;
  * upstream errors keep their status and OpenAI error body; an unreachable tier is a 502, one
    that does not answer in time a 504.

The gateway loads the model's config, tokenizer and layer order, never its weights. /health is
200 while at least one tier answered its /health within the last HEALTH_FRESH_S seconds (probed
every HEALTH_INTERVAL_S, and refreshed by every successful proxied request), 503 otherwise: a
gateway with no live tier is taken out of its Service instead of answering 502s.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http import HTTPStatus

import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.background import BackgroundTask

from adadepth.config import DepthPolicyMode, EngineConfig
from adadepth.model.depth_plan import LAYER_ORDER_FILE, DepthPlan
from adadepth.model.loader import load_config, resolve_model
from adadepth.outputs import DepthDecision
from adadepth.sampling_params import SamplingParams
from adadepth.server.api_server import _api_key_check
from adadepth.server.backend_map import Backend, BackendMap
from adadepth.server.config import ServerConfig
from adadepth.server.depth_policy import DepthCurvePolicy, DepthPolicy, FullDepthPolicy
from adadepth.server.errors import (APIError, bad_request, from_validation_error, from_value_error, install_error_handlers,
                                    model_not_found)
from adadepth.server.gateway_metrics import GatewayMetrics, ProxyTrace
from adadepth.server.gateway_relay import Relay, unreachable, upstream_error
from adadepth.server.tier_selector import QUEUE_INTERVAL_S, TierSelector
from adadepth.server.lifecycle import InFlightMiddleware, ServerLifecycle, serve_until_drained
from adadepth.server.openai_serving import ClientDisconnected, OpenAIServing, shutting_down
from adadepth.server.protocol import StreamOptions, StrictModel

logger = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 5.0
HEALTH_FRESH_S = 30.0
PROBE_TIMEOUT_S = 5.0
# Generation may take minutes; the connection must open quickly.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=60.0)
# Fields only adadepth understands: stock vLLM refuses a request that carries them.
ADADEPTH_FIELDS = ("depth", "quality")


# ---- the model, without its weights ----------------------------------------------------
@dataclass
class GatewayModel:
    name: str
    aliases: tuple[str, ...]
    num_layers: int
    max_model_len: int
    tokenizer: object
    plan: DepthPlan | None  # the layer order (no bypass tensors); None before any is stored
    depth_curve: DepthCurvePolicy | None = None  # the router's calibration curve, when stored

    @classmethod
    def load(cls, engine_config: EngineConfig) -> "GatewayModel":
        """config.json, tokenizer and layer_order.json of `--model`; a GGUF is converted (once, cached)."""
        from transformers import AutoTokenizer

        mc = engine_config.model
        resolved = resolve_model(mc.model, mc.cache_dir)
        hf_config = load_config(resolved.checkpoint_dir)
        num_layers = hf_config.num_hidden_layers
        plan = None
        if DepthPlan.exists(resolved.plan_dir):
            # Read the order alone: bypass maps (D x D per layer) are the engine's business.
            with open(os.path.join(resolved.plan_dir, LAYER_ORDER_FILE)) as f:
                meta = json.load(f)
            plan = DepthPlan(meta["num_layers"], list(meta["layer_order"]), meta.get("source", "unknown"))
            if plan.num_layers != num_layers:
                raise ValueError(f"{resolved.plan_dir}/{LAYER_ORDER_FILE} is for {plan.num_layers} layers, "
                                 f"model has {num_layers}")
        max_len = min(engine_config.scheduler.max_model_len, getattr(hf_config, "max_position_embeddings", 1 << 30))
        return cls(mc.served_model_name or resolved.name, (mc.model,), num_layers, max_len,
                   AutoTokenizer.from_pretrained(resolved.checkpoint_dir), plan,
                   DepthCurvePolicy.find(resolved.plan_dir, num_layers))


# ---- endpoints -------------------------------------------------------------------------
def _completion_prompts(model: GatewayModel, body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return list(prompt)
    raise bad_request("prompt must be a string, a list of strings or token ids", param="prompt")


def _message_text(content) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content if isinstance(content, str) else ""


def _chat_prompts(model: GatewayModel, body: dict) -> list[str | list[int]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise bad_request("messages must be a non-empty list of message objects", param="messages")
    conversation = [{"role": m.get("role"), "content": _message_text(m.get("content"))} for m in messages]
    try:
        return [model.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=body.get("add_generation_prompt", True) is not False)]
    except Exception as exc:  # noqa: BLE001 - any template failure is bad input here
        raise bad_request(f"the chat template cannot render these messages: {exc}", param="messages") from None


@dataclass(frozen=True)
class Endpoint:
    path: str
    prompts: Callable[[GatewayModel, dict], list[str | list[int]]]  # what a DepthPolicy reads


COMPLETIONS = Endpoint("/v1/completions", _completion_prompts)
CHAT = Endpoint("/v1/chat/completions", _chat_prompts)


class RoutingFields(StrictModel):
    """The fields the gateway reads; everything else goes to the tier as sent."""
    model: str | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    depth: int | float | None = None
    quality: float | None = None


@dataclass
class _BackendState:
    model: str | None   # the name it serves, once known
    last_ok: float | None = None  # monotonic time it last answered
    last_error: str | None = None


class Gateway:
    def __init__(self, model: GatewayModel, backends: BackendMap, config: ServerConfig,
                 policy: DepthPolicy | None = None, load_aware: bool = False):
        """load_aware (`--depth-policy load`): a request may go to a deeper tier than its quality
        needs, the deepest that is not queueing (from the tiers' own /metrics)."""
        if backends.num_layers != model.num_layers:
            raise ValueError(f"the backend map is for {backends.num_layers} layers, the model has {model.num_layers}")
        self.model = model
        self.backends = backends
        self.config = config
        self.policy = policy or model.depth_curve or FullDepthPolicy(model.num_layers)
        curve = self.policy.curve if isinstance(self.policy, DepthCurvePolicy) else None
        self.tiers = TierSelector(backends, load_aware, curve)
        self.metrics = GatewayMetrics(model.name, model.num_layers, model.max_model_len)
        self.model_names = {model.name, *model.aliases}
        self.state = {b.depth: _BackendState(b.model) for b in backends.backends}
        self.client: httpx.AsyncClient | None = None
        self._health_task: asyncio.Task | None = None

    # ---- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        # No connection cap: the tiers queue and refuse (429) by themselves.
        self.client = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self._health_task = asyncio.create_task(self._probe_forever())

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        if self.client is not None:
            await self.client.aclose()

    # ---- backend health and model discovery --------------------------------------------
    @property
    def is_healthy(self) -> bool:
        now = time.monotonic()
        return any(s.last_ok is not None and now - s.last_ok <= HEALTH_FRESH_S for s in self.state.values())

    def backend_status(self) -> dict[str, dict]:
        now = time.monotonic()
        return {str(b.depth): {"url": b.url, "model": self.state[b.depth].model,
                               "seconds_since_ok": None if self.state[b.depth].last_ok is None
                               else round(now - self.state[b.depth].last_ok, 1),
                               "last_error": self.state[b.depth].last_error} for b in self.backends.backends}

    async def _probe_forever(self) -> None:
        last_health = -math.inf
        while True:
            if time.monotonic() - last_health >= HEALTH_INTERVAL_S:
                last_health = time.monotonic()
                await asyncio.gather(*(self.probe(b) for b in self.backends.backends))
            if self.tiers.load_aware:
                await self.tiers.read_queues(self.client)
            await asyncio.sleep(QUEUE_INTERVAL_S if self.tiers.load_aware else HEALTH_INTERVAL_S)

    async def probe(self, backend: Backend) -> None:
        state = self.state[backend.depth]
        try:
            response = await self.client.get(backend.url + "/health", timeout=PROBE_TIMEOUT_S)
            if response.status_code != HTTPStatus.OK:
                state.last_error = f"GET /health: {response.status_code}"
                return
            if state.model is None:
                await self.served_model(backend)
            state.last_ok, state.last_error = time.monotonic(), None
        except (httpx.HTTPError, APIError) as exc:
            state.last_error = f"{type(exc).__name__}: {exc}"

    async def served_model(self, backend: Backend) -> str:
        """The model name the backend serves: from the map, else its GET /v1/models (remembered)."""
        state = self.state[backend.depth]
        if state.model is not None:
            return state.model
        try:
            response = await self.client.get(backend.url + "/v1/models", timeout=PROBE_TIMEOUT_S)
            response.raise_for_status()
            state.model = response.json()["data"][0]["id"]
        except httpx.HTTPError as exc:
            raise unreachable(backend, exc) from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise APIError(HTTPStatus.BAD_GATEWAY, f"the depth-{backend.depth} backend {backend.url} lists no model "
                           "on GET /v1/models; name it in the backend map: {\"<depth>\": {\"url\": ..., "
                           "\"model\": ...}}", "upstream_error", None, "backend_unavailable") from None
        return state.model

    # ---- depth -------------------------------------------------------------------------
    def decide(self, body: dict, fields: RoutingFields, endpoint: Endpoint) -> DepthDecision:
        """The depth the engine would run this request at."""
        quality = fields.quality
        if fields.depth is None and quality is None:
            quality = self.config.default_quality
        num_layers = self.model.num_layers
        try:
            params = SamplingParams(depth=fields.depth, quality=quality)
            depth = params.resolve_depth(num_layers)
        except ValueError as exc:
            raise from_value_error(exc) from None
        if depth is not None:
            return DepthDecision(depth, num_layers, "request", params.quality)
        prompts = endpoint.prompts(self.model, body) if self.policy.needs_prompt else [None]
        # One request goes to one tier: the deepest any of its prompts needs.
        return max((self.policy.choose(p, params) for p in prompts), key=lambda d: d.depth)

    def report(self, decision: DepthDecision, backend: Backend) -> dict:
        return {"depth": backend.depth, "requested_depth": decision.depth, "num_layers": self.model.num_layers,
                "source": decision.source, "quality": decision.quality,
                "predicted_agreement": decision.predicted_agreement, "backend": backend.url}

    # ---- proxying ----------------------------------------------------------------------
    async def proxy(self, raw_request: Request, endpoint: Endpoint) -> Response:
        arrival = time.monotonic()
        raw = await raw_request.body()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise bad_request(f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object", code="invalid_type")
        try:
            fields = RoutingFields.model_validate(body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None
        if fields.model is not None and fields.model not in self.model_names:
            raise model_not_found(fields.model, self.model.name)
        decision = self.decide(body, fields, endpoint)
        backend, decision = self.tiers.pick(decision)
        upstream = {k: v for k, v in body.items() if k not in ADADEPTH_FIELDS}
        upstream["model"] = await self.served_model(backend)
        stream = bool(fields.stream)
        wants_usage = bool(fields.stream_options and (fields.stream_options.include_usage
                                                      or fields.stream_options.continuous_usage_stats))
        if stream and not wants_usage:
            upstream["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        trace = ProxyTrace(arrival, decision, backend.depth)
        report = self.report(decision, backend)
        url = backend.url + endpoint.path
        if stream:
            return await self._stream(backend, url, upstream, trace, report, forward_usage=wants_usage)
        self.metrics.request_started()
        try:
            response = await OpenAIServing.unless_disconnected(raw_request, self.client.post(url, json=upstream))
        except ClientDisconnected:
            self.metrics.record_abort()
            return Response(status_code=499)
        except httpx.HTTPError as exc:
            self.note_failure(backend, exc)
            raise unreachable(backend, exc) from None
        finally:
            self.metrics.request_ended()
        self.metrics.record_tier(backend.depth, response.status_code)
        if response.status_code != HTTPStatus.OK:
            return upstream_error(response.status_code, response.content)
        try:
            payload = response.json()
        except ValueError:
            raise APIError(HTTPStatus.BAD_GATEWAY, f"the depth-{backend.depth} backend answered with a body that is "
                           "not JSON", "upstream_error", None, "bad_backend_response") from None
        self.note_answer(backend)
        if isinstance(payload, dict):
            trace.take_usage(payload.get("usage"))
            trace.take_finish_reasons(payload.get("choices"))
            payload["adadepth"] = report
        self.metrics.record_finished(trace, time.monotonic())
        return JSONResponse(payload)

    async def _stream(self, backend: Backend, url: str, upstream: dict, trace: ProxyTrace, report: dict,
                      forward_usage: bool) -> Response:
        self.metrics.request_started()
        try:
            response = await self.client.send(self.client.build_request("POST", url, json=upstream), stream=True)
        except httpx.HTTPError as exc:
            self.metrics.request_ended()
            self.note_failure(backend, exc)
            raise unreachable(backend, exc) from None
        self.metrics.record_tier(backend.depth, response.status_code)
        if response.status_code != HTTPStatus.OK:
            try:
                content = await response.aread()
            finally:
                await response.aclose()
                self.metrics.request_ended()
            return upstream_error(response.status_code, content)
        self.note_answer(backend)
        relay = Relay(self, backend, response, trace, report, forward_usage)
        # The background close also covers a client gone before the first event was relayed.
        return StreamingResponse(relay.events(), media_type="text/event-stream", background=BackgroundTask(relay.close))

    def note_answer(self, backend: Backend) -> None:
        state = self.state[backend.depth]
        state.last_ok, state.last_error = time.monotonic(), None

    def note_failure(self, backend: Backend, exc: Exception) -> None:
        self.state[backend.depth].last_error = f"{type(exc).__name__}: {exc}"
        logger.warning("depth-%d backend %s failed: %s: %s", backend.depth, backend.url, type(exc).__name__, exc)


# ---- the app ---------------------------------------------------------------------------
def build_gateway_app(gateway: Gateway) -> FastAPI:
    created = int(time.time())
    model = gateway.model

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.close()

    app = FastAPI(title="adadepth gateway", lifespan=lifespan)
    app.state.gateway = gateway
    app.state.metrics = gateway.metrics
    lifecycle = app.state.lifecycle = ServerLifecycle(gateway.config.shutdown_timeout)
    install_error_handlers(app)
    app.add_middleware(InFlightMiddleware, lifecycle=lifecycle)

    async def accepting() -> None:
        if lifecycle.draining:
            raise shutting_down()

    protected = [Depends(accepting), Depends(_api_key_check(gateway.config.api_key))]

    @app.get("/health")
    async def health() -> Response:
        if lifecycle.draining:
            return shutting_down().response()
        if gateway.is_healthy:
            return Response(status_code=HTTPStatus.OK)
        return APIError(HTTPStatus.SERVICE_UNAVAILABLE,
                        f"no backend answered /health in the last {HEALTH_FRESH_S:.0f}s: "
                        f"{json.dumps(gateway.backend_status())}", "service_unavailable", None,
                        "no_backend").response()

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": model.name, "object": "model", "created": created, "owned_by": "adadepth", "root": model.name,
                "parent": None, "max_model_len": model.max_model_len, "num_layers": model.num_layers,
                "depth_tiers": gateway.backends.depths}

    @app.get("/v1/models", dependencies=protected)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}", dependencies=protected)
    async def retrieve_model(model_id: str) -> dict:
        if model_id not in gateway.model_names:
            raise model_not_found(model_id, model.name, HTTPStatus.NOT_FOUND)
        return model_card()

    @app.post("/v1/completions", dependencies=protected)
    async def create_completion(raw_request: Request) -> Response:
        return await gateway.proxy(raw_request, COMPLETIONS)

    @app.post("/v1/chat/completions", dependencies=protected)
    async def create_chat_completion(raw_request: Request) -> Response:
        return await gateway.proxy(raw_request, CHAT)

    return app


def run_gateway(engine_config: EngineConfig, config: ServerConfig, policy: DepthPolicy | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every upstream call at INFO: with --depth-policy load that is each tier's /metrics
    # twice a second.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    model = GatewayModel.load(engine_config)
    backends = BackendMap.parse(config.backend_map, model.num_layers)
    if backends.deepest.depth < model.num_layers:
        logger.warning("the deepest tier runs %d of %d layers: requests for more run at depth %d",
                       backends.deepest.depth, model.num_layers, backends.deepest.depth)
    if model.depth_curve is not None:  # `quality` is answered, as an engine with a router does
        config = config.for_router(True)
    load_aware = engine_config.depth_policy.policy is DepthPolicyMode.LOAD
    app = build_gateway_app(Gateway(model, backends, config, policy, load_aware=load_aware))
    logger.info("gateway for %s (%d layers) on http://%s:%d; tiers: %s", model.name, model.num_layers, config.host,
                config.port, ", ".join(f"{b.depth} -> {b.url}" for b in backends.backends))
    serve_until_drained(app, config)

