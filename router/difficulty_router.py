"""The learned difficulty router: prompt features -> predicted agreement per depth -> depth.

Policy: a request with quality q in (0, 1] runs the smallest grid depth whose predicted
agreement with the full-depth model is >= q (full depth, which agrees by definition, when none
is). An explicit `depth` never reaches the router; a request with neither depth nor quality
runs at full depth. The choice is made once, in the request's first prefill, and kept for its
whole life (a preempted request is recomputed at the depth it was given).

Engine hook (used by `ModelRunner`): `feature_layers` (k) and `route_features(features, seqs)`,
called with each undecided prompt's residual stream after layers 0..k-1, pooled (whole prompts
in their prefill step, chunked ones as their chunks pass).

Saved beside the model's depth plan (artifact folder or checkpoint folder):
    router.json          feature config, depth grid, layer-order fingerprint, training summary
    router.safetensors   the predictor (standardization, PCA projection, head)
A router is only valid for the layer order it was trained with: loading it for another order
is refused.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass

import torch

from adadepth.model.depth_plan import DepthPlan
from adadepth.outputs import DepthDecision
from adadepth.router.agreement_predictor import AgreementPredictor, PredictorShape
from adadepth.router.depth_grid import DepthGrid
from adadepth.router.prefill_features import PrefillFeatures

ROUTER_CONFIG_FILE = "router.json"
ROUTER_WEIGHTS_FILE = "router.safetensors"
FORMAT_VERSION = 1


@dataclass
class RouterStats:
    """Work done by `route` since the router was built (for timing reports)."""
    calls: int = 0
    prompts: int = 0
    seconds: float = 0.0


class DifficultyRouter:
    def __init__(self, predictor: AgreementPredictor, grid: DepthGrid, feature_layers: int, fingerprint: str,
                 info: dict | None = None):
        if predictor.shape.num_depths != len(grid.partial):
            raise ValueError(f"predictor has {predictor.shape.num_depths} outputs, grid {list(grid.depths)} "
                             f"has {len(grid.partial)} partial depths")
        if not 0 <= feature_layers <= grid.num_layers:
            raise ValueError(f"feature_layers must be in [0, {grid.num_layers}], got {feature_layers}")
        self.predictor = predictor.eval()
        self.grid = grid
        self.feature_layers = feature_layers
        self.fingerprint = fingerprint
        self.info = dict(info or {})
        self.stats = RouterStats()

    @property
    def num_layers(self) -> int:
        return self.grid.num_layers

    @property
    def min_depth(self) -> int:
        return self.grid.min_depth

    # ---- prediction and policy --------------------------------------------------------
    @torch.no_grad()
    def predict(self, features: PrefillFeatures) -> torch.Tensor:
        """(n, len(grid)) predicted agreement at every grid depth; the last column (full depth) is 1."""
        partial = self.predictor(features)                                       # (n, G)
        return torch.cat([partial, torch.ones(len(features), 1, dtype=partial.dtype)], dim=-1)

    def choose(self, predicted: list[float], quality: float) -> tuple[int, float]:
        """(depth, its predicted agreement): the smallest grid depth predicted to reach `quality`."""
        for depth, agreement in zip(self.grid.depths, predicted):
            if agreement >= quality:
                return depth, agreement
        return self.num_layers, 1.0

    def decide(self, features: PrefillFeatures, qualities: list[float | None],
               allowances: list[int | None] | None = None) -> list[DepthDecision]:
        """allowances (`--depth-policy load`): per prompt, the depth the server can afford now; a
        prompt runs the deeper of it (rounded up to a grid depth) and its quality's floor."""
        predicted = self.predict(features).tolist()
        decisions = []
        for i, (row, quality) in enumerate(zip(predicted, qualities)):
            if quality is None:
                decisions.append(DepthDecision(self.num_layers, self.num_layers, "default", None))
                continue
            depth, agreement = self.choose(row, quality)
            source = "router"
            allowance = allowances[i] if allowances is not None else None
            if allowance is not None and allowance > depth:
                g = next(j for j, d in enumerate(self.grid.depths) if d >= allowance)
                depth, agreement, source = self.grid.depths[g], row[g], "load"
            decisions.append(DepthDecision(depth, self.num_layers, source, quality, round(agreement, 4)))
        return decisions

    def route_features(self, features: PrefillFeatures, seqs) -> list[DepthDecision]:
        """Engine hook: depths for `seqs` from their pooled prefill features."""
        t0 = time.perf_counter()
        decisions = self.decide(features, [s.params.quality for s in seqs],
                                [getattr(s, "depth_allowance", None) for s in seqs])
        self.stats.calls += 1
        self.stats.prompts += len(seqs)
        self.stats.seconds += time.perf_counter() - t0
        return decisions

    # ---- persistence ------------------------------------------------------------------
    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "depth_grid": list(self.grid.depths),
            "layer_order_fingerprint": self.fingerprint,
            "features": {"feature_layers": self.feature_layers, "pooling": ["mean", "last"],
                         "length_features": ["log_prompt_tokens"]},
            "predictor": asdict(self.predictor.shape),
            "num_trained_parameters": self.predictor.num_trained_parameters,
            "info": self.info,
        }

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        state = {k: v.detach().float().contiguous().cpu() for k, v in self.predictor.state_dict().items()}
        save_file(state, os.path.join(folder, ROUTER_WEIGHTS_FILE))
        with open(os.path.join(folder, ROUTER_CONFIG_FILE), "w") as f:
            json.dump(self.config_dict(), f, indent=1)

    @classmethod
    def load(cls, folder: str, plan: DepthPlan, hidden_size: int | None = None) -> "DifficultyRouter":
        """Load the router stored in `folder` for a model with `plan`; ValueError if it was
        trained for another layer order (or another model shape)."""
        from safetensors.torch import load_file

        path = os.path.join(folder, ROUTER_CONFIG_FILE)
        with open(path) as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: router format {meta.get('format_version')} is not {FORMAT_VERSION}; retrain it")
        if meta["num_layers"] != plan.num_layers or meta["layer_order_fingerprint"] != plan.fingerprint():
            raise ValueError(
                f"{path} was trained for layer order [{meta['layer_order_fingerprint']}] ({meta['num_layers']} "
                f"layers), but the model's order is [{plan.fingerprint()}] ({plan.source}). Its predictions "
                "do not hold for another order: relabel and retrain it (`adadepth router label`, "
                "`adadepth router train`) or delete router.json / router.safetensors.")
        shape = PredictorShape(**meta["predictor"])
        if hidden_size is not None and shape.feature_dim != 2 * hidden_size:
            raise ValueError(f"{path} expects hidden size {shape.feature_dim // 2}, the model has {hidden_size}")
        predictor = AgreementPredictor(shape)
        predictor.load_state_dict(load_file(os.path.join(folder, ROUTER_WEIGHTS_FILE)))
        grid = DepthGrid(tuple(meta["depth_grid"]), meta["num_layers"])
        k = meta["features"]["feature_layers"]
        grid.check_feature_layers(plan, k)
        return cls(predictor, grid, k, meta["layer_order_fingerprint"], meta.get("info"))

    @classmethod
    def find(cls, folder: str, plan: DepthPlan, hidden_size: int | None = None) -> "DifficultyRouter | None":
        """The router stored with a model (its plan folder), or None when there is none."""
        if not os.path.exists(os.path.join(folder, ROUTER_CONFIG_FILE)):
            return None
        return cls.load(folder, plan, hidden_size)
