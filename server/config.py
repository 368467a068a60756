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
        "help": "most requests waiting for their first token; more are refused with 429 (0: no bound)"})
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
        if self.default_quality is not None and not 0 < self.default_quality <= 1:
            raise ValueError(f"default_quality must be in (0, 1], got {self.default_quality}")
        if self.backend_map is not None and not self.backend_map.strip():
            raise ValueError("backend_map must be a JSON object or a file path, got an empty string")
        if self.uvicorn_log_level not in LOG_LEVELS:
            raise ValueError(f"uvicorn_log_level must be one of {', '.join(LOG_LEVELS)}, got {self.uvicorn_log_level!r}")

    def for_router(self, has_router: bool) -> "ServerConfig":
        """This config, with the router default quality filled in when the engine has a router."""
        if has_router and self.default_quality is None:
            return replace(self, default_quality=ROUTER_DEFAULT_QUALITY)
        return self
