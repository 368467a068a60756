"""Which layers a request of depth `d` runs, and what stands in for the layers it skips.

`layer_order` lists the model's layers from most to least useful: a request of depth `d` runs
`layer_order[:d]`, always in their natural (ascending) order. Depth sets are therefore nested:
the depth-d set contains the depth-(d-1) set, so a request never needs KV cache for a layer it
skips, and dropping "one more layer" always drops `layer_order[d-1]`.

A skipped layer is the identity, or a cheap replacement op ("bypass") stored with the model:
`h_out = h_in @ weight.T + bias`, a d_model x d_model linear map fitted by calibration.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

LAYER_ORDER_FILE = "layer_order.json"
BYPASS_FILE = "bypass.safetensors"


@dataclass
class DepthPlan:
    num_layers: int
    layer_order: list[int]
    source: str = "early-exit"  # how the order was obtained, for humans and version checks
    # layer index -> (weight (D, D), bias (D,) or None); absent layers are skipped as identity.
    bypass: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if sorted(self.layer_order) != list(range(self.num_layers)):
            raise ValueError(
                f"layer_order must be a permutation of 0..{self.num_layers - 1}, got {self.layer_order}")
        for layer in self.bypass:
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"bypass given for layer {layer}, model has {self.num_layers}")

    @classmethod
    def early_exit(cls, num_layers: int) -> "DepthPlan":
        """Keep layers 0..d-1: the plain early-exit order."""
        return cls(num_layers, list(range(num_layers)), source="early-exit")

    @property
    def rank(self) -> list[int]:
        """rank[l] = position of layer l in layer_order; layer l runs for depth d iff d > rank[l]."""
        rank = [0] * self.num_layers
        for position, layer in enumerate(self.layer_order):
            rank[layer] = position
        return rank

    def layers_for_depth(self, depth: int) -> list[int]:
        self.check_depth(depth)
        return sorted(self.layer_order[:depth])

    def check_depth(self, depth: int) -> None:
        if not 1 <= depth <= self.num_layers:
            raise ValueError(f"depth must be in [1, {self.num_layers}], got {depth}")

    def fingerprint(self) -> str:
        """Identifies the order: routers are trained for one order and check it on load."""
        return ",".join(map(str, self.layer_order))

    # ---- persistence -------------------------------------------------------------------
    def save(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, LAYER_ORDER_FILE), "w") as f:
            json.dump({"num_layers": self.num_layers, "layer_order": self.layer_order,
                       "source": self.source}, f, indent=1)
        bypass_path = os.path.join(folder, BYPASS_FILE)
        if self.bypass:
            from safetensors.torch import save_file
            tensors = {}
            for layer, (weight, bias) in self.bypass.items():
                tensors[f"layers.{layer}.weight"] = weight.detach().float().contiguous().cpu()
                if bias is not None:
                    tensors[f"layers.{layer}.bias"] = bias.detach().float().contiguous().cpu()
            save_file(tensors, bypass_path)
        elif os.path.exists(bypass_path):
            os.remove(bypass_path)

    @classmethod
    def load(cls, folder: str) -> "DepthPlan":
        with open(os.path.join(folder, LAYER_ORDER_FILE)) as f:
            meta = json.load(f)
        bypass: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        bypass_path = os.path.join(folder, BYPASS_FILE)
        if os.path.exists(bypass_path):
            from safetensors.torch import load_file
            tensors = load_file(bypass_path)
            for name, tensor in tensors.items():
                _, layer, kind = name.split(".")
                if kind == "weight":
                    bypass[int(layer)] = (tensor, tensors.get(f"layers.{layer}.bias"))
        return cls(meta["num_layers"], list(meta["layer_order"]), meta.get("source", "unknown"), bypass)

    @classmethod
    def exists(cls, folder: str) -> bool:
        return os.path.exists(os.path.join(folder, LAYER_ORDER_FILE))
