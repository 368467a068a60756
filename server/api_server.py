"""The OpenAI-compatible HTTP server: FastAPI routes over an `AsyncEngine`.

`build_app` wires one engine into one app (its own metrics registry, its own engine thread,
started and stopped with the app's lifespan); `run_server` loads the engine and runs uvicorn.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from http import HTTPStatus

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from adadepth.config import EngineConfig
from adadepth.engine.llm_engine import LLMEngine
from adadepth.hardware import pin_malloc_thresholds, use_huge_pages
from adadepth.server.async_engine import AsyncEngine, ServerShuttingDownError
from adadepth.server.chat_serving import ChatServing
from adadepth.server.completion_serving import CompletionServing
from adadepth.server.config import ServerConfig
from adadepth.server.errors import APIError, install_error_handlers, model_not_found
from adadepth.server.lifecycle import InFlightMiddleware, ServerLifecycle, serve_until_drained
from adadepth.server.metrics import ServerMetrics
from adadepth.server.openai_serving import shutting_down
from adadepth.server.openapi import ERROR_RESPONSES, install_openapi, request_body
from adadepth.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from adadepth.server.tokenize_serving import TokenizeServing

logger = logging.getLogger(__name__)


def adadepth_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("adadepth")
    except PackageNotFoundError:
        return "0"


def _api_key_check(api_key: str | None):
    """A dependency that refuses requests without `Authorization: Bearer <api_key>`."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(HTTPStatus.UNAUTHORIZED, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           "invalid_request_error", None, "invalid_api_key")

    return check


def build_app(engine: LLMEngine, config: ServerConfig, model_aliases: tuple[str, ...] = ()) -> FastAPI:
    """An app serving `engine`; `model_aliases` are extra names accepted in a request's `model`."""
    metrics = ServerMetrics(engine.model_name, engine.num_layers, engine.max_model_len)
    async_engine = AsyncEngine(engine, config.max_waiting, metrics)
    lifecycle = ServerLifecycle(config.shutdown_timeout)
    executor = ThreadPoolExecutor(1, thread_name_prefix="adadepth-preprocess")
    grammar_executor = ThreadPoolExecutor(1, thread_name_prefix="adadepth-grammar")
    completions = CompletionServing(async_engine, config, model_aliases, executor, grammar_executor)
    chat = ChatServing(async_engine, config, model_aliases, executor, grammar_executor)
    tokenization = TokenizeServing(async_engine, config, model_aliases, executor)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.on_dead = lifecycle.fatal
        async_engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(async_engine.shutdown)
            executor.shutdown(wait=False, cancel_futures=True)
            grammar_executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="adadepth", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.lifecycle = lifecycle
    app.state.fail_remaining = lambda: async_engine.fail_all(ServerShuttingDownError(
        f"the server is shutting down and this request did not finish within {config.shutdown_timeout:g} s "
        "(--shutdown-timeout)"))
    install_error_handlers(app)
    app.add_middleware(InFlightMiddleware, lifecycle=lifecycle)

    async def accepting() -> None:
        if lifecycle.draining:
            raise shutting_down()

    protected = [Depends(accepting), Depends(_api_key_check(config.api_key))]

    install_openapi(app, [CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest],
                    version=adadepth_version())

    @app.get("/health", response_class=Response, responses={200: {"description": "healthy (empty body)"},
                                                             503: ERROR_RESPONSES[503]})
    async def health() -> Response:
        if lifecycle.draining and async_engine.is_healthy:
            return shutting_down().response()
        if not async_engine.is_healthy:
            return APIError(HTTPStatus.SERVICE_UNAVAILABLE, "the engine is not running", "service_unavailable",
                            None, "engine_dead").response()
        stalled = async_engine.stalled_for()
        if config.step_timeout and stalled > config.step_timeout:
            return APIError(HTTPStatus.SERVICE_UNAVAILABLE, f"no engine step has finished for {stalled:.0f} s while "
                            "requests are running (--step-timeout)", "service_unavailable", None,
                            "engine_stalled").response()
        return Response(status_code=HTTPStatus.OK)

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text format", "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}})
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    model_card = {"id": engine.model_name, "object": "model", "created": created, "owned_by": "adadepth",
                  "root": engine.model_name, "parent": None, "max_model_len": engine.max_model_len,
                  "num_layers": engine.num_layers}

    @app.get("/v1/models", dependencies=protected, responses=ERROR_RESPONSES)
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    # OpenAI's model retrieval (the openai client's `models.retrieve`): the served name or an alias
    # (as a request's `model`); any other name is a 404.
    @app.get("/v1/models/{model_id}", dependencies=protected, responses=ERROR_RESPONSES)
    async def model(model_id: str) -> dict:
        if model_id not in completions.model_names:
            raise model_not_found(model_id, engine.model_name, HTTPStatus.NOT_FOUND)
        return model_card

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": adadepth_version()}

    generation = {200: {"description": "the completion, or its server-sent events when stream is true",
                        "content": {"application/json": {"schema": {"type": "object"}},
                                    "text/event-stream": {"schema": {
                                        "type": "object", "required": ["data"],
                                        "properties": {"data": {"type": "string"}}}}}}, **ERROR_RESPONSES}

    @app.post("/v1/completions", dependencies=protected, responses=generation,
              openapi_extra=request_body(CompletionRequest))
    async def create_completion(raw_request: Request) -> Response:
        return await completions.create(raw_request)

    @app.post("/v1/chat/completions", dependencies=protected, responses=generation,
              openapi_extra=request_body(ChatCompletionRequest))
    async def create_chat_completion(raw_request: Request) -> Response:
        return await chat.create(raw_request)

    @app.post("/tokenize", dependencies=protected, responses=ERROR_RESPONSES, openapi_extra=request_body(TokenizeRequest))
    async def tokenize(raw_request: Request) -> JSONResponse:
        return JSONResponse(await tokenization.tokenize(raw_request))

    @app.post("/detokenize", dependencies=protected, responses=ERROR_RESPONSES,
              openapi_extra=request_body(DetokenizeRequest))
    async def detokenize(raw_request: Request) -> JSONResponse:
        return JSONResponse(await tokenization.detokenize(raw_request))

    return app


def run_server(engine_config: EngineConfig, config: ServerConfig, depth_router=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    pin_malloc_thresholds()  # a step's large tensors reuse heap memory instead of page-faulting anew (see there)
    use_huge_pages()  # weights (and the KV cache) in 2 MiB pages: fewer TLB misses as steps stream them
    engine = LLMEngine(engine_config, depth_router=depth_router)
    config = config.for_router(engine.depth_router is not None)
    if engine.depth_router is not None:
        logger.info("depth router on: requests without depth or quality run at quality %s", config.default_quality)
    app = build_app(engine, config, model_aliases=(engine_config.model.model,))
    logger.info("serving %s (%d layers, context %d) on http://%s:%d", engine.model_name, engine.num_layers,
                engine.max_model_len, config.host, config.port)
    serve_until_drained(app, config)
