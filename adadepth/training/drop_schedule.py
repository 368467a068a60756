"""Which layers each training sample drops, and how the drop rate grows over training.

Two ways to drop, mixed per sample:

  * ``layer``: every layer l is dropped independently with p_l = s(t) * p_max * D(x_l), where the
    depth profile D rises from 0 to 1 - linear (x) or LayerSkip's exponential form
    (e^{x ln2} - 1) - and s(t) ramps from 0 to 1 over the first `ramp_fraction` of training
    (linearly, or LayerSkip's exponential curriculum). x_l = l / (L-1) is the layer's depth
    (`profile_axis=index`, LayerSkip) or its position in the layer order, rank_l / (L-1)
    (`profile_axis=order`, default): with an early-exit order the two are the same; with a
    measured order, "deeper" means "dropped sooner by serving", so the layers serving always
    keeps (often the last one) are not trained to be skipped;
  * ``order``: the way serving drops layers. A depth d is drawn uniformly from
    [d_min(t), L] and the sample keeps the d layers ranked highest in the layer order (nested
    sets, natural order). d_min ramps from L down to ceil(min_depth_fraction * L).

``mixed`` (default) gives each sample one of the two, `order_fraction` of them ``order``:
order drops train exactly the configurations that serving runs, the per-layer drops keep
every layer robust to its neighbours' absence (so a later re-calibrated order still works).

On top of either, `full_depth_fraction` of the samples keep every layer. They anchor the
full-depth model to the teacher: quality at depth d is measured against the *trained* model's
own full depth, so full-depth drift (rare full-depth samples let the adapter change it freely)
caps agreement at every depth. An H200 run without anchors kept 0.86 of the base's greedy
tokens at full depth, and its depth-27 agreement stalled at 0.80.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch


class DropMode(str, Enum):
    LAYER = "layer"
    ORDER = "order"
    MIXED = "mixed"

    def __str__(self) -> str:
        return self.value


class DepthProfile(str, Enum):
    LINEAR = "linear"
    EXPONENTIAL = "exponential"

    def __str__(self) -> str:
        return self.value


class ProfileAxis(str, Enum):
    INDEX = "index"
    ORDER = "order"

    def __str__(self) -> str:
        return self.value


class RampShape(str, Enum):
    LINEAR = "linear"
    EXPONENTIAL = "exponential"

    def __str__(self) -> str:
        return self.value


def _linear(x: float) -> float:
    return x


def _exponential(x: float) -> float:
    # e^{x ln 2} - 1: 0 at x = 0, 1 at x = 1, slow start (LayerSkip's form).
    return math.exp(x * math.log(2.0)) - 1.0


_SHAPES = {DepthProfile.LINEAR: _linear, DepthProfile.EXPONENTIAL: _exponential,
           RampShape.LINEAR: _linear, RampShape.EXPONENTIAL: _exponential}


@dataclass
class DropConfig:
    drop_mode: DropMode = field(default=DropMode.MIXED, metadata={
        "help": "layer (independent per-layer drops), order (nested top-d drops like serving) or mixed"})
    order_fraction: float = field(default=0.5, metadata={"help": "mixed mode: share of samples with order drops"})
    p_max: float = field(default=0.2, metadata={"help": "layer mode: drop probability of the last layer"})
    depth_profile: DepthProfile = field(default=DepthProfile.LINEAR, metadata={
        "help": "layer mode: how p rises with depth: linear or exponential (LayerSkip)"})
    profile_axis: ProfileAxis = field(default=ProfileAxis.ORDER, metadata={
        "help": "layer mode: p rises with the layer index (LayerSkip) or with its position in the layer order"})
    min_depth_fraction: float = field(default=0.5, metadata={
        "help": "order mode: depths are drawn uniformly from [ceil(f*L), L]"})
    ramp_fraction: float = field(default=0.1, metadata={
        "help": "fraction of training over which the drop rate ramps up from 0 (0: no ramp)"})
    ramp_shape: RampShape = field(default=RampShape.LINEAR, metadata={"help": "linear or exponential ramp"})
    full_depth_fraction: float = field(default=0.0, metadata={
        "help": "share of samples that keep every layer (anchors full depth to the teacher)"})
    rescale: bool = field(default=False, metadata={
        "help": "layer mode: scale a kept block's residual update by 1/(1-p_l) during training"})

    def __post_init__(self) -> None:
        self.drop_mode, self.depth_profile, self.ramp_shape, self.profile_axis = (
            DropMode(self.drop_mode), DepthProfile(self.depth_profile), RampShape(self.ramp_shape),
            ProfileAxis(self.profile_axis))
        if not 0 <= self.order_fraction <= 1:
            raise ValueError(f"order_fraction must be in [0, 1], got {self.order_fraction}")
        if not 0 <= self.full_depth_fraction < 1:
            raise ValueError(f"full_depth_fraction must be in [0, 1), got {self.full_depth_fraction}")
        if not 0 <= self.p_max < 1:
            raise ValueError(f"p_max must be in [0, 1), got {self.p_max}")
        if not 0 < self.min_depth_fraction <= 1:
            raise ValueError(f"min_depth_fraction must be in (0, 1], got {self.min_depth_fraction}")
        if not 0 <= self.ramp_fraction <= 1:
            raise ValueError(f"ramp_fraction must be in [0, 1], got {self.ramp_fraction}")

    @property
    def uses_order(self) -> bool:
        """Whether sampling depends on the layer order (a run needs one before it starts)."""
        order_drops = self.drop_mode is DropMode.ORDER or (self.drop_mode is DropMode.MIXED and self.order_fraction > 0)
        layer_drops = self.drop_mode is not DropMode.ORDER
        return order_drops or (layer_drops and self.profile_axis is ProfileAxis.ORDER)


@dataclass
class DropDecision:
    keep: torch.Tensor   # (B, L) bool: sample b runs layer l
    scale: torch.Tensor  # (B, L) float: factor on a kept block's residual update (1 unless rescaling)


class DropSchedule:
    def __init__(self, config: DropConfig, num_layers: int, layer_order: list[int] | None = None):
        if config.uses_order and layer_order is None:
            raise ValueError(f"drop mode {config.drop_mode} needs a layer order")
        self.config = config
        self.num_layers = num_layers
        rank = [0] * num_layers
        for position, layer in enumerate(layer_order or range(num_layers)):
            rank[layer] = position
        self.rank = torch.tensor(rank)  # (L,) rank[l] < d  <=>  layer l runs at depth d

    def ramp(self, progress: float) -> float:
        """s(t) in [0, 1]: how much of the final drop rate applies at training progress t in [0, 1]."""
        if self.config.ramp_fraction == 0:
            return 1.0
        x = min(1.0, max(0.0, progress / self.config.ramp_fraction))
        return _SHAPES[self.config.ramp_shape](x)

    def layer_probs(self, progress: float = 1.0) -> torch.Tensor:
        """(L,) per-layer drop probability of the ``layer`` mode at this point of training."""
        profile = _SHAPES[self.config.depth_profile]
        denom = max(1, self.num_layers - 1)
        axis = self.rank.tolist() if self.config.profile_axis is ProfileAxis.ORDER else range(self.num_layers)
        base = torch.tensor([profile(x / denom) for x in axis], dtype=torch.float64)
        return (self.config.p_max * self.ramp(progress) * base).float()

    def min_depth(self, progress: float = 1.0) -> int:
        """Shallowest depth the ``order`` mode draws at this point of training."""
        final = math.ceil(self.config.min_depth_fraction * self.num_layers)
        return max(1, round(self.num_layers - self.ramp(progress) * (self.num_layers - final)))

    def sample(self, batch_size: int, progress: float, generator: torch.Generator | None = None) -> DropDecision:
        cfg = self.config
        n = self.num_layers
        probs = self.layer_probs(progress)                                          # (L,)
        keep_layer = torch.rand(batch_size, n, generator=generator) >= probs          # (B, L)
        d_min = self.min_depth(progress)
        depths = torch.randint(d_min, n + 1, (batch_size,), generator=generator)     # (B,)
        keep_order = self.rank[None, :] < depths[:, None]                            # (B, L)
        if cfg.drop_mode is DropMode.LAYER:
            use_order = torch.zeros(batch_size, dtype=torch.bool)
        elif cfg.drop_mode is DropMode.ORDER:
            use_order = torch.ones(batch_size, dtype=torch.bool)
        else:
            use_order = torch.rand(batch_size, generator=generator) < cfg.order_fraction
        keep = torch.where(use_order[:, None], keep_order, keep_layer)               # (B, L)
        scale = torch.ones(batch_size, n)
        if cfg.rescale:
            # Only independent drops have a per-layer survival probability to undo.
            layer_scale = (1.0 / (1.0 - probs))[None, :].expand(batch_size, n)
            scale = torch.where(use_order[:, None], scale, layer_scale)
        if cfg.full_depth_fraction:
            full = torch.rand(batch_size, generator=generator) < cfg.full_depth_fraction  # (B,)
            keep = keep | full[:, None]
            scale = torch.where(full[:, None], torch.ones_like(scale), scale)
        return DropDecision(keep, scale)

    @staticmethod
    def keep_all(batch_size: int, num_layers: int) -> DropDecision:
        return DropDecision(torch.ones(batch_size, num_layers, dtype=torch.bool), torch.ones(batch_size, num_layers))
