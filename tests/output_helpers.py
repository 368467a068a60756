"""What tests read from generated outputs."""
from __future__ import annotations


def chosen_logprobs(out) -> list[float]:
    """The logprob of each token a RequestOutput's first completion chose. Needs logprobs requested
    (logprobs=0 or more: each position's dict starts with the chosen token); raises otherwise."""
    logprobs = out.outputs[0].logprobs
    if logprobs is None:
        raise AssertionError("the output carries no logprobs: request them with logprobs=0")
    return [next(iter(position.values())) for position in logprobs]
