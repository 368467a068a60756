"""Per-request settings: how to sample and how deep to run.

The field names follow vLLM's `SamplingParams` so that users feel at home; `depth` and
`quality` are adadepth's own.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

# The kinds of constraint one request may carry (exactly one), as vLLM's StructuredOutputsParams.
CONSTRAINT_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# Temperatures below this sample greedily, as in vLLM: dividing float32 logits by a smaller one
# overflows them (1e-45 is 0 in float32), and the draw would come from infinities and NaNs.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output to a JSON schema, a regex, one of some strings, an EBNF grammar or any
    JSON object (vLLM's `structured_outputs` request field; `response_format` maps onto it)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # No free whitespace between JSON tokens: a small model may otherwise emit whitespace forever.
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in CONSTRAINT_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of {', '.join(CONSTRAINT_KINDS)}; got "
                             f"{', '.join(given) or 'none'}")
        if self.choice is not None:
            if isinstance(self.choice, str) or not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        if self.json_object is False:
            raise ValueError("json_object must be true when given")

    @property
    def key(self) -> tuple:
        """Hashable identity of the constraint (the grammar cache's key)."""
        kind = next(k for k in CONSTRAINT_KINDS if getattr(self, k) is not None)
        value = getattr(self, kind)
        if isinstance(value, dict):
            value = json.dumps(value, sort_keys=True)
        return kind, value, self.disable_any_whitespace


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
    # Penalties as vLLM (and OpenAI for presence/frequency): presence and frequency subtract
    # per output token occurrence; repetition divides positive / multiplies negative logits of
    # every token seen in the prompt or the output (> 1 discourages repeats).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Added to the logit of each token id before sampling (OpenAI: -100 bans, 100 forces).
    logit_bias: dict[int, float] = field(default_factory=dict)
    # Drop tokens whose probability is below min_p x the most likely token's (after temperature).
    min_p: float = 0.0
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):  # NaN fails both
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        # A torch.Generator takes a 64-bit seed; a larger one would fail inside the engine instead.
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed must be a 64-bit signed integer, got {self.seed}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # 0, like -1, disables top-k; so does any k of 2**31 or more (no vocabulary is that large), which
        # would not even fit the sampler's int64 tensor past 2**63.
        if self.top_k == 0 or self.top_k >= 2**31:
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        self.logit_bias = {int(t): float(b) for t, b in (self.logit_bias or {}).items()}
        for token, bias in self.logit_bias.items():
            if token < 0:
                raise ValueError(f"logit_bias token ids must be >= 0, got {token}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

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
