"""The gateway's backend map: which OpenAI server serves the model cut to which depth.

`--backend-map` takes a JSON object, inline or in a file, from depth (a string of an integer
in 1..num_layers) to a backend:

    {"21": "http://adadepth-tier-21:8000", "30": "http://adadepth-tier-30:8000"}
    {"21": {"url": "http://adadepth-tier-21:8000", "model": "smollm2-depth-21"}}

A URL is the server's base (a trailing "/v1" is accepted and dropped); `model` is the name the
backend serves, discovered with GET /v1/models when left out.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

_BACKEND_KEYS = {"url", "model"}


@dataclass(frozen=True)
class Backend:
    depth: int
    url: str                 # base URL, no trailing slash, no /v1
    model: str | None = None  # served model name; None: ask the backend

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", normalize_url(self.url, self.depth))
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"backend map: depth {self.depth}: 'model' must be a non-empty string, got {self.model!r}")


def normalize_url(url, depth: int) -> str:
    if not isinstance(url, str) or not url:
        raise ValueError(f"backend map: depth {depth}: the URL must be a non-empty string, got {url!r}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"backend map: depth {depth}: {url!r} is not an http(s) URL with a host, "
                         "e.g. http://adadepth-tier-21:8000")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"backend map: depth {depth}: {url!r} has an invalid port") from None
    if parts.query or parts.fragment:
        raise ValueError(f"backend map: depth {depth}: {url!r} must not carry a query or fragment")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")]
    return f"{parts.scheme}://{parts.netloc}{path}"


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"backend map: depth {key!r} is given twice")
        seen[key] = value
    return seen


@dataclass(frozen=True)
class BackendMap:
    backends: tuple[Backend, ...]  # ascending depth
    num_layers: int

    def __post_init__(self) -> None:
        if not self.backends:
            raise ValueError("backend map: it is empty; give at least one depth, e.g. "
                             '{"21": "http://adadepth-tier-21:8000"}')
        depths = [b.depth for b in self.backends]
        if depths != sorted(set(depths)):
            raise ValueError(f"backend map: depths must be distinct and ascending, got {depths}")
        for b in self.backends:
            if not 1 <= b.depth <= self.num_layers:
                raise ValueError(f"backend map: depth {b.depth} is outside 1..{self.num_layers}, "
                                 f"the model's layers")

    @classmethod
    def parse(cls, value: str, num_layers: int) -> "BackendMap":
        """From inline JSON (starts with "{" or "[") or the path of a JSON file."""
        text = value.strip()
        source = "--backend-map"
        if not text.startswith(("{", "[")):
            if not os.path.isfile(value):
                raise FileNotFoundError(f"backend map: {value!r} is neither a JSON object nor an existing file")
            source = value
            with open(value) as f:
                text = f.read()
        try:
            raw = json.loads(text, object_pairs_hook=_no_duplicate_keys)
        except json.JSONDecodeError as exc:
            raise ValueError(f"backend map: {source} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"backend map: {source} must be a JSON object from depth to URL, "
                             f"got {type(raw).__name__}")
        backends = []
        for key, entry in raw.items():
            # Keys are layer counts: "21", not "21.0", "0x15" or " 21".
            if not (key.isascii() and key.isdigit()):
                raise ValueError(f"backend map: key {key!r} is not a depth; keys are layer counts such as \"21\"")
            depth = int(key)
            if isinstance(entry, dict):
                unknown = set(entry) - _BACKEND_KEYS
                if unknown:
                    raise ValueError(f"backend map: depth {depth}: unknown keys {sorted(unknown)}; "
                                     f"allowed: {sorted(_BACKEND_KEYS)}")
                if "url" not in entry:
                    raise ValueError(f"backend map: depth {depth}: missing 'url'")
                backends.append(Backend(depth, entry["url"], entry.get("model")))
            else:
                backends.append(Backend(depth, entry))
        seen: dict[int, Backend] = {}
        for b in backends:
            if b.depth in seen:  # "21" and "021"
                raise ValueError(f"backend map: depth {b.depth} is given twice")
            seen[b.depth] = b
        return cls(tuple(sorted(backends, key=lambda b: b.depth)), num_layers)

    @property
    def depths(self) -> list[int]:
        return [b.depth for b in self.backends]

    @property
    def deepest(self) -> Backend:
        return self.backends[-1]

    def tier_for(self, depth: int) -> Backend:
        """The shallowest tier at or above `depth` (never shallower than asked); the deepest tier
        when every tier is shallower."""
        for backend in self.backends:
            if backend.depth >= depth:
                return backend
        return self.deepest
