"""What the engine hands back: one `RequestOutput` per request, vLLM-style."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DepthDecision:
    """How deep a request runs and why: reported in API responses and metrics."""
    depth: int
    num_layers: int
    source: str  # "request" (explicit depth), "router" (from quality) or "default"
    quality: float | None = None
    predicted_agreement: float | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None
    # One entry per output token: {token_id: logprob} holding the sampled token and the top-k.
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    depth_decision: DepthDecision
    metrics: "RequestMetrics | None" = None

    @property
    def depth(self) -> int:
        return self.depth_decision.depth

    # vLLM users reach for outputs[0].text; these shortcuts serve the single-sample case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
