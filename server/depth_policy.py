"""How the gateway picks a request's depth when the request names none.

The engine server asks its depth router with the loaded model at hand; the gateway holds no
weights, so it asks a `DepthPolicy` that sees only the prompt (text or token ids) and the
request's sampling parameters. `FullDepthPolicy` is what the engine does without a router:
full depth. `DepthCurvePolicy` answers a `quality` from the router's calibration curve (the mean
agreement with full depth measured at each grid depth on held-out prompts, `depth_agreement.json`
beside the layer order): the smallest depth whose mean reaches the quality. The engine's router
decides per prompt; the curve gives the depth an average prompt needs, with no weights. A router
that can decide from the prompt alone plugs in by implementing `choose`.
"""
from __future__ import annotations

import json
import os
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


DEPTH_CURVE_FILE = "depth_agreement.json"


class DepthCurvePolicy(DepthPolicy):
    needs_prompt = False

    def __init__(self, curve: dict[int, float], num_layers: int):
        if not curve or max(curve) != num_layers:
            raise ValueError(f"a depth curve must end at full depth ({num_layers}), got depths {sorted(curve)}")
        self.curve = dict(sorted(curve.items()))
        self.num_layers = num_layers

    @classmethod
    def find(cls, plan_dir: str, num_layers: int) -> "DepthCurvePolicy | None":
        """The curve stored beside a model's layer order, if any."""
        path = os.path.join(plan_dir, DEPTH_CURVE_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            data = json.load(f)
        return cls({int(d): float(a) for d, a in data["depth_agreement"].items()}, num_layers)

    def choose(self, prompt: str | list[int] | None, params: SamplingParams) -> DepthDecision:
        quality = params.quality
        if quality is None:
            return DepthDecision(self.num_layers, self.num_layers, "default", None)
        depth = next(d for d, a in self.curve.items() if a >= quality or d == self.num_layers)
        return DepthDecision(depth, self.num_layers, "router", quality, self.curve[depth])


def write_depth_curve(results: list[dict], path: str, source: str) -> None:
    """Store a fixed-depth curve (`router eval`'s `results`: depth, agreement) for the gateway."""
    with open(path, "w") as f:
        json.dump({"source": source, "depth_agreement": {str(r["depth"]): r["agreement"] for r in results}}, f,
                  indent=1)
