"""What the gateway sends back from a tier: its errors in OpenAI's body, and its streams relayed
event by event.

A relayed stream is passed through unchanged except in two ways: the chunks carrying a
finish_reason, and the usage chunk, gain the gateway's `adadepth` report of the depth decision;
a usage chunk the gateway asked for on its own behalf is consumed, not forwarded. (Line separators
that JSON leaves raw are escaped on the way, see `adadepth.server.sse`.) A stream the
tier breaks off ends with an OpenAI error event and [DONE]. The relay also keeps the gateway's
metrics: time to each chunk, finish reasons, usage, and whether the request finished, failed or
was aborted.
"""
from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import TYPE_CHECKING

import anyio
import httpx
from fastapi.responses import JSONResponse

from adadepth.server.backend_map import Backend
from adadepth.server.errors import APIError
from adadepth.server.gateway_metrics import ProxyTrace
from adadepth.server.sse import escape_line_separators, sse, sse_events

if TYPE_CHECKING:
    from adadepth.server.gateway import Gateway


def upstream_error(status: int, content: bytes) -> JSONResponse:
    """A tier's error, with its status, in OpenAI's body (vLLM's older flat body is wrapped)."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return JSONResponse(body, status_code=status)
    if isinstance(body, dict) and "message" in body:
        return JSONResponse({"error": {k: body.get(k) for k in ("message", "type", "param", "code")}},
                            status_code=status)
    text = content.decode("utf-8", errors="replace").strip()[:2000]
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    return APIError(status, f"the backend answered {status}: {text or HTTPStatus(status).phrase}", kind).response()


def unreachable(backend: Backend, exc: httpx.HTTPError) -> APIError:
    if isinstance(exc, httpx.TimeoutException):
        return APIError(HTTPStatus.GATEWAY_TIMEOUT, f"the depth-{backend.depth} backend {backend.url} did not answer "
                        f"in time: {type(exc).__name__}", "upstream_error", None, "backend_timeout")
    return APIError(HTTPStatus.BAD_GATEWAY, f"the depth-{backend.depth} backend {backend.url} is unreachable: "
                    f"{type(exc).__name__}: {exc}", "upstream_error", None, "backend_unavailable")


def _event_data(lines: list[str]) -> str | None:
    data = [line[5:].removeprefix(" ") for line in lines if line.startswith("data:")]
    return "\n".join(data) if data else None


class Relay:
    """One stream from a tier to the client, changed in two ways (see the module docstring)."""

    def __init__(self, gateway: Gateway, backend: Backend, response: httpx.Response, trace: ProxyTrace,
                 report: dict, forward_usage: bool):
        self.gateway = gateway
        self.backend = backend
        self.response = response
        self.trace = trace
        self.report = report
        self.forward_usage = forward_usage
        self.done = False     # the tier sent [DONE]
        self.failed = False   # the tier sent an error event, or the connection broke
        self.closed = False

    async def events(self) -> AsyncIterator[str]:
        try:
            async for lines in sse_events(self.response):
                event = self._relayed("\n".join(lines) + "\n\n", _event_data(lines))
                if event is not None:  # tiers (vLLM) send U+2028 and the like raw; clients may split there
                    yield escape_line_separators(event)
        except httpx.HTTPError as exc:
            self.failed = True
            self.gateway.note_failure(self.backend, exc)
            yield sse(APIError(HTTPStatus.BAD_GATEWAY, f"the depth-{self.backend.depth} backend {self.backend.url} "
                               f"broke off the stream: {type(exc).__name__}: {exc}", "upstream_error", None,
                               "backend_unavailable").body())
            yield sse("[DONE]")
        finally:
            # Also reached when a client disconnect cancels the response task: closing the upstream
            # stream makes the tier abort the request. Shielded: the cancelled scope would stop the await.
            with anyio.CancelScope(shield=True):
                await self.close()

    def _relayed(self, raw: str, data: str | None) -> str | None:
        """What to send the client for one upstream event (None: nothing)."""
        if data is None or data == "[DONE]":  # a comment, or the end
            self.done = self.done or data == "[DONE]"
            return raw
        try:
            chunk = json.loads(data)
        except ValueError:
            return raw
        if not isinstance(chunk, dict):
            return raw
        if "error" in chunk:  # the tier failed mid-stream and said so
            self.failed = True
            return raw
        choices = chunk.get("choices")
        self.trace.take_usage(chunk.get("usage"))
        if choices:
            self.trace.on_chunk(time.monotonic())
            self.trace.take_finish_reasons(choices)
        is_usage_chunk = choices == [] and isinstance(chunk.get("usage"), dict)
        if is_usage_chunk and not self.forward_usage:
            return None  # asked for by the gateway, not by the client
        finishing = any(isinstance(c, dict) and c.get("finish_reason") is not None for c in choices or [])
        if finishing or is_usage_chunk:
            return sse({**chunk, "adadepth": self.report})
        return raw

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        await self.response.aclose()
        metrics = self.gateway.metrics
        metrics.request_ended()
        if self.done and not self.failed:
            metrics.record_finished(self.trace, time.monotonic())
        elif not self.failed:
            metrics.record_abort()
