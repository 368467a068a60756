"""The router's input: what the prefill has already computed after its first `k` layers.

No extra model pass: the engine runs `embed` + layers 0..k-1 of the prefill anyway, and the
router pools that residual stream over each prompt's tokens (mean, plus the last token), next
to the prompt length. Offline (labelling, training, evaluation) the same pooling runs on the
same layers (`FeatureExtractor`), so serving and training see identical features.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillFeatures:
    pooled: torch.Tensor   # (n, 2D) float32: [mean over prompt tokens, last prompt token] after layer k-1
    lengths: torch.Tensor  # (n,) float32: prompt tokens

    @classmethod
    def from_hidden(cls, hidden: torch.Tensor, lengths: torch.Tensor) -> "PrefillFeatures":
        """hidden: (n, T, D) residual stream of n right-padded prompts; lengths: (n,) real tokens."""
        n, t, _ = hidden.shape
        lengths = lengths.to(hidden.device)
        h = hidden.float()
        valid = (torch.arange(t, device=h.device)[None, :] < lengths[:, None]).float()   # (n, T)
        mean = (h * valid[..., None]).sum(1) / lengths[:, None].float()                    # (n, D)
        last = h[torch.arange(n, device=h.device), lengths - 1]                            # (n, D)
        return cls(torch.cat([mean, last], dim=-1).cpu(), lengths.float().cpu())

    @classmethod
    def cat(cls, parts: list["PrefillFeatures"]) -> "PrefillFeatures":
        return cls(torch.cat([p.pooled for p in parts]), torch.cat([p.lengths for p in parts]))

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> "PrefillFeatures":
        index = torch.as_tensor(index, dtype=torch.long)
        return PrefillFeatures(self.pooled[index], self.lengths[index])

    @property
    def length_features(self) -> torch.Tensor:
        """(n, 1): log prompt length."""
        return self.lengths.log()[:, None]
