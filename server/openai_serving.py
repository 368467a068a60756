"""What the completions, chat and tokenize endpoints share: parsing, model checks, submission,
waiting with disconnect detection, usage and the depth report."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from typing import TypeVar

from fastapi import Request
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError

from adadepth.outputs import RequestOutput
from adadepth.sampling_params import SamplingParams
from adadepth.server.async_engine import (AsyncEngine, EngineDeadError, EngineRequest, QueueFullError,
                                          RequestTimeoutError, ServerShuttingDownError)
from adadepth.server.config import ServerConfig
from adadepth.server.errors import APIError, bad_request, from_validation_error, from_value_error, model_not_found
from adadepth.server.output_stream import OutputStream
from adadepth.server.protocol import ChatMessage
from adadepth.server.request_limits import RequestLimits

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# JSON has no -inf; vLLM reports impossible tokens with this floor instead.
MIN_LOGPROB = -9999.0


class ClientDisconnected(Exception):
    """The client went away before its response was ready."""


def engine_dead(exc: EngineDeadError) -> APIError:
    return APIError(HTTPStatus.SERVICE_UNAVAILABLE, str(exc), "service_unavailable", None, "engine_dead")


# How an accepted request can fail: each becomes an error body (a stream: an error event, then [DONE]).
REQUEST_FAILURES = (EngineDeadError, ServerShuttingDownError, RequestTimeoutError, ValueError)


def stream_error(exc: BaseException) -> APIError:
    """The error for a request that failed after it was accepted."""
    if isinstance(exc, EngineDeadError):
        return engine_dead(exc)
    if isinstance(exc, ServerShuttingDownError):
        return shutting_down(str(exc))
    if isinstance(exc, RequestTimeoutError):
        return APIError(HTTPStatus.REQUEST_TIMEOUT, str(exc), "timeout_error", None, "request_timeout")
    return from_value_error(exc)


def shutting_down(message: str = "the server is shutting down; retry on another replica") -> APIError:
    return APIError(HTTPStatus.SERVICE_UNAVAILABLE, message, "service_unavailable", None, "shutting_down")


def clamp_logprob(value: float) -> float:
    return max(value, MIN_LOGPROB)


async def _wait_for_disconnect(raw_request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect (uvicorn sends it when
    # the socket closes, or once the response is complete).
    while True:
        message = await raw_request.receive()
        if message["type"] == "http.disconnect":
            return


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, model_aliases: tuple[str, ...] = (),
                 executor: ThreadPoolExecutor | None = None, grammar_executor: ThreadPoolExecutor | None = None):
        self.engine = engine
        self.config = config
        self.limits = RequestLimits(config)
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.model_names = {engine.model_name, *model_aliases}
        # Parsing a body, rendering a chat template and tokenizing take long enough on a large request
        # to stall every stream and /health if they ran on the event loop. One worker thread does
        # them, in arrival order (a fast tokenizer must not be used from two threads at once).
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="adadepth-preprocess")
        # Compiling a structured-output grammar (in `validate`) can take a second or more: on a thread of
        # its own, so that it does not hold up the parsing and tokenizing of every request behind it.
        self.grammar_executor = grammar_executor or ThreadPoolExecutor(1, thread_name_prefix="adadepth-grammar")

    async def off_loop(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    # ---- request parsing ---------------------------------------------------------------
    async def parse(self, raw_request: Request, model: type[M]) -> M:
        body = await self.limits.read_body(raw_request)
        try:
            return await self.off_loop(model.model_validate_json, body)
        except ValidationError as exc:
            raise from_validation_error(exc) from None

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.model_names:
            raise model_not_found(name, self.model_name)

    @staticmethod
    def build_params(build: Callable[[], SamplingParams]) -> SamplingParams:
        try:
            return build()
        except ValueError as exc:
            raise from_value_error(exc) from None

    async def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        try:
            if params.structured_outputs is None:
                self.engine.validate(prompt_token_ids, params)
            else:  # compiling a grammar can take a while: on its own thread, not the loop
                await asyncio.get_running_loop().run_in_executor(
                    self.grammar_executor, functools.partial(self.engine.validate, prompt_token_ids, params))
        except ValueError as exc:
            raise from_value_error(exc) from None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of text; a text that cannot fit the context is refused before tokenizing it
        (tokenizing megabytes takes seconds): no token covers more than `max_token_bytes` bytes,
        so a text of b bytes has at least b / max_token_bytes tokens."""
        floor = -(-len(text.encode("utf-8", "surrogatepass")) // self.engine.max_token_bytes)
        if floor >= self.engine.max_model_len:
            raise bad_request(f"the prompt has at least {floor} tokens, which leaves no room in the context of "
                              f"{self.engine.max_model_len} tokens", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_template_kwargs(self, kwargs: dict | None, chat_template: str | None = None) -> None:
        """A request's own Jinja template only when the operator trusts them; other template
        arguments only from the allow-list (they reach the template's code)."""
        kwargs = kwargs or {}
        if (chat_template is not None or "chat_template" in kwargs) and not self.config.trust_request_chat_template:
            raise bad_request("this server does not accept a chat_template in requests (the operator can allow it "
                              "with --trust-request-chat-template)", param="chat_template")
        refused = sorted(set(kwargs) - self.config.allowed_template_kwargs - {"chat_template"})
        if refused:
            allowed = ", ".join(sorted(self.config.allowed_template_kwargs)) or "none"
            raise bad_request(f"chat_template_kwargs {', '.join(map(repr, refused))} are not allowed here "
                              f"(allowed: {allowed}; --chat-template-kwargs-allowed)", param="chat_template_kwargs")

    def apply_chat_template(self, messages: list[ChatMessage], add_generation_prompt: bool,
                            continue_final_message: bool = False, kwargs: dict | None = None) -> str:
        """Render in transformers' sandboxed Jinja; kwargs must have passed `check_template_kwargs`."""
        conversation = []
        for m in messages:
            entry = {"role": m.role, "content": m.text()}
            if m.name is not None:
                entry["name"] = m.name
            conversation.append(entry)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, **(kwargs or {}))
        except (TemplateError, ValueError, TypeError) as exc:
            # The template's own checks ("roles must alternate", no template at all) are bad input.
            raise bad_request(f"the chat template cannot render these messages: {exc}", param="messages") from None

    # ---- running -----------------------------------------------------------------------
    def submit(self, requests: list[EngineRequest]) -> OutputStream:
        timeout = self.config.request_timeout
        deadline = requests[0].arrival_time + timeout if timeout else None
        try:
            return self.engine.submit(requests, deadline)
        except QueueFullError as exc:
            raise APIError(HTTPStatus.TOO_MANY_REQUESTS, str(exc), "rate_limit_error", None, "queue_full",
                           headers={"Retry-After": "1"}) from None
        except ValueError as exc:
            raise from_value_error(exc) from None
        except EngineDeadError as exc:
            raise engine_dead(exc) from None

    @staticmethod
    async def collect(stream: OutputStream) -> dict[int, RequestOutput]:
        """Every request's final output, by index; the stream is closed (aborted) on any exit."""
        finals: dict[int, RequestOutput] = {}
        async with stream:
            try:
                async for index, output in stream:
                    if output.finished:
                        finals[index] = output
            except REQUEST_FAILURES as exc:
                raise stream_error(exc) from None
        return finals

    @staticmethod
    async def unless_disconnected(raw_request: Request, work: Awaitable[T]) -> T:
        """Await `work`, cancelling it (which aborts its requests) if the client disconnects first."""
        task = asyncio.ensure_future(work)
        watcher = asyncio.ensure_future(_wait_for_disconnect(raw_request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not task.done():
                task.cancel()
        if task.cancelled() or not task.done():  # cancelled just above: its cancellation is still pending
            raise ClientDisconnected()
        return task.result()

    # ---- reporting ---------------------------------------------------------------------
    def depth_report(self, outputs: list[RequestOutput]) -> dict:
        """The top-level `adadepth` object: what ran (the first choice; all choices when they differ)."""
        d = outputs[0].depth_decision
        report = {"depth": d.depth, "num_layers": d.num_layers, "source": d.source, "quality": d.quality,
                  "predicted_agreement": d.predicted_agreement}
        depths = [o.depth_decision.depth for o in outputs]
        if len(set(depths)) > 1:
            report["choice_depths"] = depths
        return report

    @staticmethod
    def usage(prompt_lens: list[int], outputs: list[RequestOutput]) -> dict:
        prompt_tokens = sum(prompt_lens)
        completion_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
                "layers_per_token": layers_per_token(outputs)}

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])


def layers_per_token(outputs: list[RequestOutput]) -> float:
    """Depth averaged over the choices, weighted by the tokens each generated (every generated
    token ran its request's depth); a plain mean while no choice has tokens."""
    if not outputs:
        return 0.0
    weights = [len(o.outputs[0].token_ids) for o in outputs]
    depths = [o.depth_decision.depth for o in outputs]
    if sum(weights) == 0:
        return float(sum(depths)) / len(depths)
    return float(sum(w * d for w, d in zip(weights, depths))) / sum(weights)
