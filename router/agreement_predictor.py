"""Predicted agreement with the full-depth model at each partial depth of the grid.

    pooled (n, 2D) --standardize--> --PCA--> (n, P) ┐
    log prompt length (n, 1) --standardize--------> ├─ cat (n, P+1) -> MLP (or linear) -> (n, G) raw
                                                    ┘
    logit_0 = raw_0, logit_j = logit_{j-1} + softplus(raw_j)     monotone non-decreasing in depth
    agreement = sigmoid(a * logit + b)                             (n, G), G = partial grid depths

(a, b) is Platt scaling fitted on held-back labelled prompts after the head is trained: a head
fitted on a few hundred prompts is over-confident, and the policy (smallest depth whose
prediction reaches q) picks exactly the over-estimates, so without it the predicted agreement
of the routed depths ran 0.05-0.09 above the realized one. a > 0 keeps predictions monotone.

The standardization, PCA projection and score scaling are fitted once from the training features (no gradient);
only the small head is trained: (P+1)*H + H + H*G + G parameters (about 1.3k for P=H=32, G=6).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adadepth.router.prefill_features import PrefillFeatures


@dataclass(frozen=True)
class PredictorShape:
    feature_dim: int     # 2D: pooled mean + last token
    pca_dims: int        # P
    hidden_size: int     # H; 0 = a linear head (ordinal logistic regression)
    num_depths: int      # G: partial depths of the grid

    def __post_init__(self) -> None:
        if self.feature_dim < 1 or self.pca_dims < 1 or self.num_depths < 1 or self.hidden_size < 0:
            raise ValueError(f"bad predictor shape {self}")
        if self.pca_dims > self.feature_dim:
            raise ValueError(f"pca_dims ({self.pca_dims}) exceeds the feature size ({self.feature_dim})")


class AgreementPredictor(nn.Module):
    def __init__(self, shape: PredictorShape):
        super().__init__()
        self.shape = shape
        f, p = shape.feature_dim, shape.pca_dims
        self.register_buffer("feature_mean", torch.zeros(f))
        self.register_buffer("feature_std", torch.ones(f))
        self.register_buffer("components", torch.eye(f, p))          # (2D, P)
        self.register_buffer("score_std", torch.ones(p))              # (P,) std of the training PCA scores
        self.register_buffer("length_mean", torch.zeros(1))
        self.register_buffer("length_std", torch.ones(1))
        self.register_buffer("calib_scale", torch.ones(1))            # a (Platt scaling)
        self.register_buffer("calib_bias", torch.zeros(1))            # b
        if shape.hidden_size:
            self.head = nn.Sequential(nn.Linear(p + 1, shape.hidden_size), nn.GELU(),
                                      nn.Linear(shape.hidden_size, shape.num_depths))
        else:
            self.head = nn.Sequential(nn.Linear(p + 1, shape.num_depths))

    @property
    def num_trained_parameters(self) -> int:
        return sum(p.numel() for p in self.head.parameters())

    @torch.no_grad()
    def fit_inputs(self, features: PrefillFeatures) -> None:
        """Fit standardization and the PCA projection on the training features."""
        x = features.pooled.float()
        self.feature_mean.copy_(x.mean(0))
        self.feature_std.copy_(x.std(0).clamp_min(1e-6))
        z = (x - self.feature_mean) / self.feature_std                                 # (n, 2D)
        # Right singular vectors of the centred data = principal directions.
        _, _, vh = torch.linalg.svd(z - z.mean(0), full_matrices=False)                # vh: (min(n, 2D), 2D)
        p = self.shape.pca_dims
        comps = torch.zeros(self.shape.feature_dim, p)
        k = min(p, vh.shape[0])
        comps[:, :k] = vh[:k].T
        self.components.copy_(comps)
        self.score_std.copy_((z @ comps).std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones(p))
        lens = features.length_features
        self.length_mean.copy_(lens.mean(0))
        self.length_std.copy_(lens.std(0).clamp_min(1e-6) if len(features) > 1 else torch.ones(1))

    def inputs(self, features: PrefillFeatures) -> torch.Tensor:
        """(n, P+1) standardized projected features."""
        x = features.pooled.to(self.components)
        z = ((x - self.feature_mean) / self.feature_std) @ self.components / self.score_std   # (n, P)
        lens = (features.length_features.to(x) - self.length_mean) / self.length_std   # (n, 1)
        return torch.cat([z, lens], dim=-1)

    def logits(self, features: PrefillFeatures) -> torch.Tensor:
        raw = self.head(self.inputs(features))                                         # (n, G)
        steps = torch.cat([raw[:, :1], F.softplus(raw[:, 1:])], dim=-1)                # (n, G)
        return steps.cumsum(-1)                                                        # non-decreasing

    def forward(self, features: PrefillFeatures) -> torch.Tensor:
        """(n, G) predicted agreement at each partial grid depth, non-decreasing in depth."""
        return torch.sigmoid(self.calib_scale * self.logits(features) + self.calib_bias)

    def fit_calibration(self, features: PrefillFeatures, y: torch.Tensor, w: torch.Tensor, steps: int = 500) -> None:
        """Fit (a, b) by weighted BCE on (features, y (n, G), w (n,)) with the head frozen."""
        with torch.no_grad():
            logits = self.logits(features)                                             # (n, G)
        log_a = torch.zeros(1, requires_grad=True)   # a = exp(log_a) > 0
        b = torch.zeros(1, requires_grad=True)
        opt = torch.optim.Adam([log_a, b], lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            weighted_bce(torch.sigmoid(log_a.exp() * logits + b), y, w).backward()
            opt.step()
        with torch.no_grad():
            self.calib_scale.copy_(log_a.exp())
            self.calib_bias.copy_(b)


def weighted_bce(pred: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """BCE of predicted (n, G) against labelled (n, G) agreement, each prompt weighted by w (n,)."""
    return (F.binary_cross_entropy(pred.clamp(1e-6, 1 - 1e-6), y, reduction="none") * w[:, None]).mean()
