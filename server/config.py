"""HTTP server settings; `adadepth serve` builds its flags from these fields.

The served model name is the engine's (`--served-model-name` of ModelConfig), so it is not
repeated here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

API_KEY_ENV = "ADADEPTH_API_KEY"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
# `adadepth serve` routes requests that set neither depth nor quality at this quality when the
# model has a depth router and --default-quality is not given.
ROUTER_DEFAULT_QUALITY = 0.9


@dataclass
class ServerConfig:
    host: str = field(default="0.0.0.0", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": f"require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
                f"(falls back to ${API_KEY_ENV}; none: open)"})
    max_waiting: int = field(default=256, metadata={
        "help": "most sequences (prompts x n) waiting for their first token; a request that would pass it is "
                "refused with 429 and Retry-After (0: no bound)"})
    # ---- limits on one request (each answered with OpenAI's error body) ----
    max_request_bytes: int = field(default=4 << 20, metadata={"help": "largest request body in bytes (413 beyond)"})
    max_n: int = field(default=32, metadata={"help": "largest n (samples per prompt)"})
    max_prompts_per_request: int = field(default=64, metadata={"help": "most prompts in one completions request"})
    max_stop_strings: int = field(default=16, metadata={"help": "most stop strings in one request"})
    max_stop_string_chars: int = field(default=256, metadata={"help": "longest stop string, in characters"})
    max_messages: int = field(default=1024, metadata={"help": "most messages in one chat request"})
    max_logprobs: int = field(default=20, metadata={"help": "largest logprobs / top_logprobs (OpenAI's bound)"})
    max_logit_bias: int = field(default=1024, metadata={"help": "most logit_bias entries in one request"})
    max_structured_output_chars: int = field(default=65536, metadata={
        "help": "longest structured-output constraint (JSON schema, regex, grammar or all choices), in characters: "
                "compiling one takes CPU time from every running request"})
    max_structured_output_choices: int = field(default=1024, metadata={
        "help": "most choices in a structured_outputs.choice constraint (their compile time grows faster than their number)"})
    # ---- templates ----
    trust_request_chat_template: bool = field(default=False, metadata={
        "help": "accept a Jinja chat_template sent in a request (off: such requests get 400)"})
    chat_template_kwargs_allowed: str = field(default="enable_thinking", metadata={
        "help": "comma-separated chat_template_kwargs a request may pass to the template; others get 400"})
    # ---- time ----
    request_timeout: float = field(default=0.0, metadata={
        "help": "seconds a request may take from arrival; past it, it is aborted and its client gets an error "
                "(408; a stream an error event) (0: no limit)"})
    shutdown_timeout: float = field(default=30.0, metadata={
        "help": "on SIGTERM: seconds in-flight requests may still run (new ones get 503) before the rest are "
                "aborted and the server exits"})
    step_timeout: float = field(default=60.0, metadata={
        "help": "/health answers 503 when requests are running and no engine step has finished for this many "
                "seconds (0: no watchdog)"})
    default_quality: float | None = field(default=None, metadata={
        "help": "quality in (0, 1] for requests that set neither depth nor quality (none: "
                f"{ROUTER_DEFAULT_QUALITY} when the model has a depth router, else full depth)"})
    uvicorn_log_level: str = field(default="info", metadata={"help": "uvicorn log level: " + ", ".join(LOG_LEVELS)})
    access_log: bool = field(default=True, metadata={"help": "log every HTTP request"})
    backend_map: str | None = field(default=None, metadata={"help": (
        "serve as a gateway in front of depth tiers instead of loading the weights: a JSON object, or a file "
        "holding one, from depth to the base URL of an OpenAI server of the model cut to that depth "
        "(`adadepth export`), e.g. '{\"21\": \"http://tier-21:8000\"}' or '{\"21\": {\"url\": ..., \"model\": ...}}'; "
        "each request goes to the shallowest tier at or above its depth")})

    def __post_init__(self) -> None:
        # Read the environment here, not as the field default, so `--help` never prints the key.
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0 (0: no bound), got {self.max_waiting}")
        for name in ("max_request_bytes", "max_n", "max_prompts_per_request", "max_stop_strings",
                     "max_stop_string_chars", "max_messages", "max_logit_bias", "max_structured_output_chars",
                     "max_structured_output_choices"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(f"max_logprobs must be in [0, 20] (the engine's bound), got {self.max_logprobs}")
        for name in ("request_timeout", "shutdown_timeout", "step_timeout"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.default_quality is not None and not 0 < self.default_quality <= 1:
            raise ValueError(f"default_quality must be in (0, 1], got {self.default_quality}")
        if self.backend_map is not None and not self.backend_map.strip():
            raise ValueError("backend_map must be a JSON object or a file path, got an empty string")
        if self.uvicorn_log_level not in LOG_LEVELS:
            raise ValueError(f"uvicorn_log_level must be one of {', '.join(LOG_LEVELS)}, got {self.uvicorn_log_level!r}")

    @property
    def allowed_template_kwargs(self) -> frozenset[str]:
        return frozenset(k.strip() for k in self.chat_template_kwargs_allowed.split(",") if k.strip())

    def for_router(self, has_router: bool) -> "ServerConfig":
        """This config, with the router default quality filled in when the engine has a router."""
        if has_router and self.default_quality is None:
            return replace(self, default_quality=ROUTER_DEFAULT_QUALITY)
        return self
