"""Turns last-position logits into next tokens, one row per sequence, all rows at once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadepth.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token_id: logprob} with the sampled token and the row's top-k, or None.
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, eos_token_ids: set[int]):
        self.eos_token_ids = sorted(eos_token_ids)

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: (B, V) float32, row i belongs to seqs[i]."""
        b, vocab = logits.shape
        device = logits.device
        self._mask_early_stops(logits, seqs)
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            # Logprobs describe the model's distribution, before temperature/top-k/top-p (as vLLM).
            raw_logprobs = torch.log_softmax(logits, dim=-1)                    # (B, V)

        greedy = torch.tensor([s.params.greedy for s in seqs], device=device)
        tokens = logits.argmax(dim=-1)                                           # (B,)
        if not bool(greedy.all()):
            temps = torch.tensor([s.params.temperature if not s.params.greedy else 1.0 for s in seqs],
                                 device=device, dtype=logits.dtype)
            scaled = logits / temps[:, None]                                     # (B, V)
            scaled = self._top_k_top_p(scaled, seqs)
            probs = torch.softmax(scaled, dim=-1)                                # (B, V)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p; seeded rows draw E
            # from their own generator so their tokens do not depend on batch neighbours.
            noise = torch.empty_like(probs).exponential_()
            for i, s in enumerate(seqs):
                if s.generator is not None and not s.params.greedy:
                    noise[i] = torch.empty(vocab, device=device).exponential_(generator=s.generator)
            sampled = (probs / noise).argmax(dim=-1)
            tokens = torch.where(greedy, tokens, sampled)

        token_list = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * b
        if raw_logprobs is not None:
            for i, s in enumerate(seqs):
                k = s.params.logprobs
                if k is None:
                    continue
                entry = {token_list[i]: float(raw_logprobs[i, token_list[i]])}
                if k > 0:
                    top = raw_logprobs[i].topk(k)
                    entry.update(zip(top.indices.tolist(), top.values.tolist()))
                logprobs[i] = entry
        return SamplerOutput(token_list, logprobs)

    def _mask_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: a row may not end (EOS or a stop token id) before producing that many."""
        for i, s in enumerate(seqs):
            if len(s.output_token_ids) < s.params.min_tokens:
                banned = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")

    @staticmethod
    def _top_k_top_p(scaled: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        top_k = [s.params.top_k for s in seqs]
        top_p = [s.params.top_p for s in seqs]
        if all(k == -1 for k in top_k) and all(p >= 1.0 for p in top_p):
            return scaled
        vocab = scaled.shape[-1]
        sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)          # (B, V)
        k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=scaled.device)
        ranks = torch.arange(vocab, device=scaled.device)[None, :]                # (1, V)
        drop = ranks >= k[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        p = torch.tensor(top_p, device=scaled.device, dtype=probs.dtype)
        drop |= mass_before >= p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(scaled).scatter_(-1, sorted_idx, sorted_logits)
