"""Per-request settings: how to sample and how deep to run.

The field names follow vLLM's `SamplingParams` so that users feel at home; `depth` and
`quality` are adadepth's own.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables top-k, as in vLLM
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # number of top logprobs per output token; None = none
    n: int = 1
    # Depth: number of layers (int >= 1) or a fraction of the model's layers in (0, 1].
    # None: let the router decide from `quality` (full depth when there is no router).
    depth: int | float | None = None
    # Target agreement with the full-depth model in (0, 1]; only used when depth is None.
    quality: float | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0:
            self.top_k = -1
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.min_tokens < 0 or self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.depth is not None:
            if isinstance(self.depth, bool) or not isinstance(self.depth, (int, float)):
                raise ValueError(f"depth must be a layer count or a fraction in (0, 1], got {self.depth!r}")
            if isinstance(self.depth, float) and not 0 < self.depth <= 1:
                raise ValueError(
                    f"depth as a float is a fraction of the layers and must be in (0, 1], got {self.depth}; "
                    "pass an int for a layer count")
            if isinstance(self.depth, int) and self.depth < 1:
                raise ValueError(f"depth must be >= 1 layer, got {self.depth}")
        if self.quality is not None and not 0 < self.quality <= 1:
            raise ValueError(f"quality must be in (0, 1], got {self.quality}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def resolve_depth(self, num_layers: int) -> int | None:
        """The layer count this request asks for, or None when it leaves it to the router."""
        if self.depth is None:
            return None
        if isinstance(self.depth, float):
            # Round to the nearest layer, never below one layer.
            return max(1, min(num_layers, round(self.depth * num_layers)))
        if self.depth > num_layers:
            raise ValueError(f"depth {self.depth} exceeds the model's {num_layers} layers")
        return self.depth
