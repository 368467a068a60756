"""Router features for prompts outside the engine (labelling, training, evaluation).

Runs exactly what the engine's routed prefill runs before routing - `AdaptiveLlama.embed` and
`run_layers(0, k)` with every row at full depth - on batches of right-padded prompts, and pools
it with `PrefillFeatures.from_hidden`.
"""
from __future__ import annotations

import torch

from adadepth.model.adaptive_llama import AdaptiveLlama
from adadepth.router.prefill_features import PrefillFeatures
from adadepth.training.sequence_forward import SequenceBatch, SequenceForward


class FeatureExtractor:
    def __init__(self, model: AdaptiveLlama, feature_layers: int, batch_size: int = 16):
        if not 0 <= feature_layers <= model.num_layers:
            raise ValueError(f"feature_layers must be in [0, {model.num_layers}], got {feature_layers}")
        self.model = model
        self.feature_layers = feature_layers
        self.batch_size = batch_size
        self.fwd = SequenceForward(model)

    @torch.inference_mode()
    def extract(self, prompts: list[list[int]]) -> PrefillFeatures:
        """prompts: token ids of each prompt; features come back in prompts' order."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        parts = []
        for start in range(0, len(order), self.batch_size):
            chunk = [prompts[i] for i in order[start: start + self.batch_size]]
            seqs = SequenceBatch.build(chunk, self.fwd.device)
            batch = self.fwd.forward_batch(seqs, self.model.num_layers)
            h = self.model.embed(batch)                                                  # (B, T, D)
            h = self.model.run_layers(h, batch, self.fwd.scratch_kv(seqs.input_ids.numel()), 0, self.feature_layers)
            parts.append(PrefillFeatures.from_hidden(h, seqs.lengths))
        features = PrefillFeatures.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return features.select(inverse)
