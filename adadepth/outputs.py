"""What the engine hands back: one `RequestOutput` per request, vLLM-style.

Each step's outputs carry what is new since that request's previous output (text, token ids,
logprobs), so a step costs the same at token 10 and at token 10,000; `merge_delta` folds them into
the whole output for readers that want it (`LLM.generate`, the server's streams).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class DepthDecision:
    """How deep a request runs and why: reported in API responses and metrics."""
    depth: int
    num_layers: int
    source: str  # "request" (explicit depth), "router" (from quality), "load" (deeper than its
                 # quality needs: --depth-policy load had room) or "default"
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
    num_tokens: int = 0  # output tokens so far, whole request (token_ids may be just the newest)


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


def merge_delta(whole: RequestOutput | None, delta: RequestOutput) -> RequestOutput:
    """Fold one step's output of a request into its output so far (None: the first); returns the
    whole output, which owns its lists (the delta's are not reused)."""
    d = delta.outputs[0]
    if whole is None:
        first = dataclasses.replace(d, token_ids=list(d.token_ids),
                                    logprobs=None if d.logprobs is None else list(d.logprobs))
        return dataclasses.replace(delta, outputs=[first])
    w = whole.outputs[0]
    w.text += d.text
    w.token_ids.extend(d.token_ids)
    if d.logprobs is not None:
        if w.logprobs is None:
            w.logprobs = []
        w.logprobs.extend(d.logprobs)
    w.finish_reason, w.stop_reason, w.num_tokens = d.finish_reason, d.stop_reason, d.num_tokens
    whole.finished, whole.metrics, whole.depth_decision = delta.finished, delta.metrics, delta.depth_decision
    return whole
