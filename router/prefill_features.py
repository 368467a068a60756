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


@dataclass
class PrefillFeatureSum:
    """`PrefillFeatures` of one prompt built chunk by chunk (chunked prefill): the sum and the
    last row of its residual stream after the feature layers, as `from_hidden` pools them whole."""
    total: torch.Tensor        # (D,) float32, sum over the prompt's tokens so far
    last: torch.Tensor         # (D,) float32, the latest token's row
    num_tokens: int

    @classmethod
    def start(cls, hidden: torch.Tensor) -> "PrefillFeatureSum":
        """hidden: (c, D) the first chunk's rows."""
        h = hidden.float()
        return cls(h.sum(0), h[-1].clone(), h.shape[0])

    def add(self, hidden: torch.Tensor) -> None:
        """hidden: (c, D) the next chunk's rows, in prompt order."""
        h = hidden.float()
        self.total += h.sum(0)
        self.last = h[-1].clone()
        self.num_tokens += h.shape[0]

    def features(self) -> PrefillFeatures:
        mean = self.total / self.num_tokens                                      # (D,)
        pooled = torch.cat([mean, self.last])[None]                              # (1, 2D)
        return PrefillFeatures(pooled.cpu(), torch.tensor([float(self.num_tokens)]))
