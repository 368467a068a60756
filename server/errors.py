"""Errors as OpenAI sends them: `{"error": {"message", "type", "param", "code"}}` with a status.

Handlers raise `APIError`; `install_error_handlers` turns it, pydantic's validation errors,
routing errors and unexpected exceptions into that body, so clients never see FastAPI's 422
shape or an HTML 500 page; a client gone before its body arrived gets a bodiless 499.
"""
from __future__ import annotations

import logging
import re
import uuid
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

logger = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.headers = dict(headers or {})
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = dict(self.headers)
        if self.status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(HTTPStatus.BAD_REQUEST, message, "invalid_request_error", param, code)


def model_not_found(name: str, served: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> APIError:
    """A request naming a model this server does not serve (400), or a model looked up by name (404)."""
    return APIError(status, f"the model '{name}' does not exist; this server serves '{served}'",
                    "invalid_request_error", "model", "model_not_found")


# Field names that may open a ValueError message from SamplingParams or the engine
# ("max_tokens must be ..."): reported as the error's `param`.
_PARAM_NAMES = {"max_tokens", "temperature", "top_p", "top_k", "min_tokens", "logprobs", "n", "depth",
                "quality", "seed", "stop", "stop_token_ids", "prompt", "presence_penalty", "frequency_penalty", "repetition_penalty",
                "min_p", "logit_bias", "choice", "structured_outputs"}
# Pydantic names union members in an error's location ("depth" -> "int"); they are not fields.
_UNION_TAG = re.compile(r"^(int|float|str|bool|dict|list\[.*\]|[A-Z]\w*)$")


def from_value_error(exc: ValueError) -> APIError:
    message = str(exc)
    first = message.split(" ", 1)[0]
    return bad_request(message, param=first if first in _PARAM_NAMES else None)


def from_validation_error(exc: ValidationError | RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    path = [str(p) for p in first["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))]
    if path and path[0] == "body":  # FastAPI prefixes body fields with "body"
        path = path[1:]
    param = ".".join(path) or None
    if first["type"] == "missing":
        return bad_request(f"missing required field '{param}'", param=param, code="missing_field")
    if first["type"] == "model_type" or first["type"] == "dict_type":
        message = "the request body must be a JSON object" if not path else f"'{param}' must be an object"
        return bad_request(message, param=param, code="invalid_type")
    # Several errors on one field are the members of a union failing one by one: merge them.
    same = [e for e in errors if [str(p) for p in e["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p))] == path]
    msgs = sorted({e["msg"] for e in same})
    return bad_request(f"invalid value for '{param}': {'; or '.join(msgs)}", param=param, code="invalid_type")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    @app.exception_handler(ValidationError)
    async def _pydantic_error(request: Request, exc: ValidationError) -> JSONResponse:
        return from_validation_error(exc).response()

    # The client closed the connection before its whole body arrived: there is no one to answer, and
    # nothing went wrong here (not a 500 with a traceback). 499, as for a client gone while waiting.
    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
        logger.info("%s %s: the client disconnected before sending the whole request body",
                    request.method, request.url.path)
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = HTTPStatus(exc.status_code)
        code = "not_found" if status == HTTPStatus.NOT_FOUND else None
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, "invalid_request_error", None, code).response()

    app.add_middleware(CatchAllMiddleware)


class CatchAllMiddleware:
    """Turn an unexpected exception into a JSON 500 and stop it there.

    Starlette's own catch-all answers too, but then re-raises, and uvicorn drops the
    connection, which breaks the client's next request on that keep-alive connection.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:  # noqa: BLE001 - a bug, not bad input: log it, answer, keep serving
            # The exception's text may hold internals (paths, values): it goes to the log only; the
            # client gets an id to quote, which the log line carries too.
            error_id = f"err-{uuid.uuid4().hex[:16]}"
            logger.exception("internal error %s while serving %s %s", error_id, scope.get("method"), scope.get("path"))
            if started:  # the response is under way (a stream broke): nothing more can be said on it
                return
            response = APIError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal server error (id {error_id})",
                                "internal_server_error", None, "internal_error").response()
            await response(scope, receive, send)
