"""Bounds on what one request may ask for, so that no single client can queue unbounded work.

Each bound is a `ServerConfig` flag with a safe default; a request past one gets OpenAI's error
body: 413 for the body size, 400 for the rest. The context-length bound (prompt + max_tokens)
is the engine's own check (`LLMEngine.validate`).
"""
from __future__ import annotations

import json
from http import HTTPStatus

from fastapi import Request

from adadepth.server.config import ServerConfig
from adadepth.server.errors import APIError, bad_request


def too_large(message: str) -> APIError:
    return APIError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, message, "invalid_request_error", None, "request_too_large")


class RequestLimits:
    def __init__(self, config: ServerConfig):
        self.config = config

    async def read_body(self, raw_request: Request) -> bytes:
        """The body, refused (413) as soon as it passes the limit: a client cannot make the server
        buffer more than that, whether or not it sends a Content-Length."""
        limit = self.config.max_request_bytes
        declared = raw_request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large(f"the request body has {int(declared)} bytes; this server accepts at most {limit} "
                            "(--max-request-bytes)")
        chunks, size = [], 0
        async for chunk in raw_request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(f"the request body passes {limit} bytes, the most this server accepts "
                                "(--max-request-bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    def check(self, req) -> None:
        """The bounds every generation request shares (completions and chat)."""
        c = self.config
        if req.n is not None and req.n > c.max_n:
            raise bad_request(f"n is {req.n}; this server allows at most {c.max_n} (--max-n)", param="n")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > c.max_stop_strings:
            raise bad_request(f"{len(stops)} stop strings; this server allows at most {c.max_stop_strings} "
                              "(--max-stop-strings)", param="stop")
        if any(len(s) > c.max_stop_string_chars for s in stops):
            raise bad_request(f"a stop string is longer than {c.max_stop_string_chars} characters "
                              "(--max-stop-string-chars)", param="stop")
        if req.stop_token_ids is not None and len(req.stop_token_ids) > c.max_stop_strings:
            raise bad_request(f"{len(req.stop_token_ids)} stop token ids; this server allows at most "
                              f"{c.max_stop_strings} (--max-stop-strings)", param="stop_token_ids")
        if req.logit_bias is not None and len(req.logit_bias) > c.max_logit_bias:
            raise bad_request(f"{len(req.logit_bias)} logit_bias entries; this server allows at most "
                              f"{c.max_logit_bias} (--max-logit-bias)", param="logit_bias")
        self.check_structured_outputs(req)

    def check_structured_outputs(self, req) -> None:
        """A constraint's size: a grammar is compiled against the whole vocabulary on the server's CPU,
        in time that grows with it (faster than linearly for choices)."""
        c = self.config
        so, rf = req.structured_outputs, req.response_format
        if so is not None:
            if so.choice is not None and len(so.choice) > c.max_structured_output_choices:
                raise bad_request(f"{len(so.choice)} choices; this server allows at most "
                                  f"{c.max_structured_output_choices} (--max-structured-output-choices)",
                                  param="structured_outputs.choice")
            texts, param = [so.regex, so.grammar, *(so.choice or [])], "structured_outputs"
            texts.append(so.json_ if isinstance(so.json_, str) or so.json_ is None else json.dumps(so.json_))
        elif rf is not None and rf.json_schema is not None and rf.json_schema.schema_ is not None:
            texts, param = [json.dumps(rf.json_schema.schema_)], "response_format"
        else:
            return
        size = sum(len(t) for t in texts if t is not None)
        if size > c.max_structured_output_chars:
            raise bad_request(f"the structured-output constraint has {size} characters; this server allows at most "
                              f"{c.max_structured_output_chars} (--max-structured-output-chars)", param=param)

    def check_logprobs(self, value: int | None, param: str) -> None:
        if value is not None and value > self.config.max_logprobs:
            raise bad_request(f"{param} is {value}; this server allows at most {self.config.max_logprobs} "
                              "(--max-logprobs)", param=param)

    def check_prompts(self, count: int) -> None:
        if count > self.config.max_prompts_per_request:
            raise bad_request(f"{count} prompts in one request; this server allows at most "
                              f"{self.config.max_prompts_per_request} (--max-prompts-per-request)", param="prompt")

    def check_messages(self, count: int) -> None:
        if count > self.config.max_messages:
            raise bad_request(f"{count} messages; this server allows at most {self.config.max_messages} "
                              "(--max-messages)", param="messages")
