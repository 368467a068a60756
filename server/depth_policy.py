"""How the gateway picks a request's depth when the request names none.

The engine server asks its depth router with the loaded model at hand; the gateway holds no
weights, so it asks a `DepthPolicy` that sees only the prompt (text or token ids) and the
request's sampling parameters. `FullDepthPolicy` is what the engine does without a router:
full depth. A router that can decide from the prompt alone plugs in by implementing `choose`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from adadepth.outputs import DepthDecision
from adadepth.sampling_params import SamplingParams


class DepthPolicy(ABC):
    # Whether `choose` reads the prompt. When False the gateway passes None and skips rendering
    # chat templates, which is most of its per-request CPU.
    needs_prompt: bool = True

    @abstractmethod
    def choose(self, prompt: str | list[int] | None, params: SamplingParams) -> DepthDecision:
        """The depth for a request that named no depth (`params.quality` may hold a target)."""


class FullDepthPolicy(DepthPolicy):
    """No router: every such request runs the whole model, as the engine does without one."""
    needs_prompt = False

    def __init__(self, num_layers: int):
        self.num_layers = num_layers

    def choose(self, prompt: str | list[int] | None, params: SamplingParams) -> DepthDecision:
        return DepthDecision(self.num_layers, self.num_layers, "default", params.quality)
