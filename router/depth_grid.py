"""The depths a router chooses from, and how many leading layers every one of them runs.

A router picks one depth of a fixed grid (e.g. 12, 15, ..., 30 for a 30-layer model). Its
features are read after the first `k` layers in natural order, so those layers must run at
every depth of the grid: layers 0..k-1 must all be in the smallest grid depth's layer set
(`DepthPlan.layers_for_depth(min_depth)`). Full depth is always the grid's last entry.
"""
from __future__ import annotations

from dataclasses import dataclass

from adadepth.model.depth_plan import DepthPlan

# Default grid as fractions of the layer count: 0.4, 0.5, ..., 1.0 (12, 15, ..., 30 for 30 layers).
DEFAULT_FRACTIONS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class DepthGrid:
    depths: tuple[int, ...]  # ascending, unique, last == num_layers
    num_layers: int

    def __post_init__(self) -> None:
        d = list(self.depths)
        if not d or d != sorted(set(d)):
            raise ValueError(f"depth grid must be ascending and without repeats, got {d}")
        if d[0] < 1 or d[-1] != self.num_layers:
            raise ValueError(f"depth grid must lie in [1, {self.num_layers}] and end at full depth "
                             f"{self.num_layers}, got {d}")

    @classmethod
    def default(cls, num_layers: int) -> "DepthGrid":
        return cls(tuple(sorted({max(1, round(num_layers * f)) for f in DEFAULT_FRACTIONS})), num_layers)

    @classmethod
    def parse(cls, text: str, num_layers: int) -> "DepthGrid":
        """'12,15,18' (full depth is appended when missing) or '' for the default grid."""
        if not text.strip():
            return cls.default(num_layers)
        try:
            depths = sorted({int(x) for x in text.split(",") if x.strip()})
        except ValueError:
            raise ValueError(f"depth grid must be comma-separated integers, got {text!r}") from None
        if depths and depths[-1] > num_layers:
            raise ValueError(f"depth grid {depths} exceeds the model's {num_layers} layers")
        return cls(tuple(sorted(set(depths) | {num_layers})), num_layers)

    @property
    def min_depth(self) -> int:
        return self.depths[0]

    @property
    def partial(self) -> tuple[int, ...]:
        """The depths below full depth: those whose agreement is predicted (full depth agrees by definition)."""
        return self.depths[:-1]

    def max_feature_layers(self, plan: DepthPlan) -> int:
        """Largest k such that layers 0..k-1 all run at the smallest grid depth."""
        rank = plan.rank
        k = 0
        while k < plan.num_layers and rank[k] < self.min_depth:
            k += 1
        return k

    def check_feature_layers(self, plan: DepthPlan, k: int) -> None:
        limit = self.max_feature_layers(plan)
        if not 0 <= k <= limit:
            raise ValueError(f"feature_layers={k}: layers 0..{k - 1} must all run at the grid's smallest depth "
                             f"{self.min_depth}; this layer order allows at most {limit}")
