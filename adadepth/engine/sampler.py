"""Turns last-position logits into next tokens, one row per sequence, all rows at once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadepth.engine.logits_processors import apply_logit_bias, apply_min_p, apply_penalties, apply_top_k_top_p
from adadepth.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]
    # Per row: {token_id: logprob} with the sampled token and the row's top-k, or None.
    logprobs: list[dict[int, float] | None]


class Sampler:
    """eos_token_ids: what min_tokens holds back. structured: the grammar matchers' bitmask filler
    (`StructuredOutputManager`), needed only when sequences carry a grammar."""

    def __init__(self, eos_token_ids: set[int], structured=None):
        self.eos_token_ids = sorted(eos_token_ids)
        self.structured = structured

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: (B, V) float32, row i belongs to seqs[i]."""
        b, vocab = logits.shape
        device = logits.device
        raw_logprobs = None
        if any(s.params.logprobs is not None for s in seqs):
            # Logprobs describe the model's distribution, before any processing (vLLM's default).
            raw_logprobs = torch.log_softmax(logits, dim=-1)                    # (B, V)
        self.process(logits, seqs)
        greedy_rows = [s.params.greedy for s in seqs]
        greedy = torch.tensor(greedy_rows, device=device)
        # A step of sampled rows only skips the argmax over (B, V).
        tokens = logits.argmax(dim=-1) if any(greedy_rows) else torch.zeros(b, dtype=torch.long, device=device)
        if not all(greedy_rows):
            probs = torch.softmax(self.sampling_logits(logits, seqs), dim=-1)    # (B, V)
            # Inverse CDF: one uniform number per row picks the first token whose cumulative
            # probability exceeds it (tokens of probability 0 never). A random number per vocabulary
            # entry (an exponential race) made sampled steps of a CPU server far slower than greedy
            # ones. Seeded rows draw theirs from their own generator: their tokens do not depend on
            # their batch neighbours.
            u = torch.rand(b, dtype=torch.float64, device=device)                # (B,)
            for i, s in enumerate(seqs):
                if s.generator is not None and not s.params.greedy:
                    u[i] = torch.rand(1, generator=s.generator, dtype=torch.float64, device=device)[0]
            cdf = probs.to(torch.float64).cumsum(dim=-1)                         # (B, V)
            sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]   # (B,)
            tokens = torch.where(greedy, tokens, sampled.clamp_(max=vocab - 1))

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

    def process(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """In place, what changes greedy choices too: grammar masks, min_tokens, logit bias, penalties."""
        if self.structured is not None and any(s.grammar is not None for s in seqs):
            self.structured.apply_bitmask(logits, seqs)
        self._mask_early_stops(logits, seqs)
        apply_logit_bias(logits, seqs)
        apply_penalties(logits, seqs)

    @staticmethod
    def sampling_logits(processed: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The logits a sampled row draws from: processed / temperature, then min-p, top-k, top-p
        (greedy rows get temperature 1; their token is the argmax anyway)."""
        temps = torch.tensor([s.params.temperature if not s.params.greedy else 1.0 for s in seqs],
                             device=processed.device, dtype=processed.dtype)
        scaled = processed / temps[:, None]                                      # (B, V)
        return apply_top_k_top_p(apply_min_p(scaled, seqs), seqs)

    def _mask_early_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """min_tokens: a row may not end (EOS or a stop token id) before producing that many.
        A row under a grammar is left to it: the grammar decides when the output is complete."""
        for i, s in enumerate(seqs):
            if len(s.output_token_ids) < s.params.min_tokens and s.grammar is None:
                banned = list(s.params.stop_token_ids) + ([] if s.params.ignore_eos else self.eos_token_ids)
                if banned:
                    logits[i, banned] = float("-inf")
