"""The OpenAPI schema describes what the routes really take and answer.

The routes read their bodies themselves (size limits, parsing off the event loop), so FastAPI
cannot see their request models; `request_body` and `ERROR_RESPONSES` declare them, and
`install_openapi` adds the pydantic models (adadepth's `depth`, `quality` and structured-output
fields included) to the schema's components. Fuzzers (schemathesis) and client generators read
this schema.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string", "minLength": 1},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "integer", "null"]}},
    }},
}
_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
# Every failure a route may answer, each with OpenAI's error body.
ERROR_RESPONSES = {
    400: {"description": "invalid request", **_ERROR},
    401: {"description": "missing or wrong API key", **_ERROR},
    404: {"description": "unknown path or model", **_ERROR},
    405: {"description": "method not allowed", **_ERROR},
    408: {"description": "past --request-timeout", **_ERROR},
    413: {"description": "body larger than --max-request-bytes", **_ERROR},
    429: {"description": "queue full (--max-waiting); see Retry-After", **_ERROR},
    503: {"description": "shutting down, or the engine is not running", **_ERROR},
}


def request_body(model: type[BaseModel]) -> dict:
    """openapi_extra for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def install_openapi(app: FastAPI, models: list[type[BaseModel]], version: str) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=version, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}", by_alias=True)
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            components["ErrorResponse"] = ERROR_SCHEMA
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
