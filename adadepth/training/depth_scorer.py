"""Teacher-forced scoring of every depth against full depth, on the engine's own model.

Rows are whole sequences (prompt + continuation or reference); only the positions that predict
the scored tokens count. Per prompt and depth the raw counts are kept (`DepthScore`) so that
callers can pool them over positions (evaluation) or read them per prompt (router labels).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adadepth.training.sequence_forward import SequenceBatch, SequenceForward


@dataclass
class DepthScore:
    matches: int = 0
    positions: int = 0
    kl_sum: float = 0.0
    nll_sum: float = 0.0
    ref_tokens: int = 0
    exact_match: bool | None = None
    # One "1"/"0" per scored continuation position, in order: which positions agree. Split-half
    # analyses (odd vs even positions) need them; the counts above are their sums.
    match_bits: str = ""
    # Depth-d's own greedy continuation, when the caller asked for it (free-running quality).
    continuation: list[int] | None = None

    @property
    def agreement(self) -> float:
        return self.matches / self.positions if self.positions else float("nan")


def _positions_of(lengths: list[tuple[int, int]], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows with (start, end): flat (row, pos) of positions start-1..end-2 (they predict tokens
    start..end-1) and each position's row index. Returns (rows, cols, row_of_each)."""
    rows, cols = [], []
    for r, (start, end) in enumerate(lengths):
        cols.extend(range(start - 1, end - 1))
        rows.extend([r] * (end - start))
    return (torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(cols, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long))


def _per_row(row_of: torch.Tensor, num_rows: int, *values: torch.Tensor) -> list[tuple[float, ...]]:
    """Sum each (n,) value tensor per row: one tuple of sums per row."""
    sums = [torch.bincount(row_of, weights=v, minlength=num_rows).tolist() for v in values]
    return list(zip(*sums))


class DepthScorer:
    """Teacher-forced agreement / KL / NLL of every depth against full depth, batch by batch."""

    def __init__(self, llm, depths: list[int], batch_size: int):
        self.llm = llm
        self.num_layers = llm.num_layers
        bad = [d for d in depths if d > self.num_layers]
        if bad:
            raise ValueError(f"depths {bad} exceed the model's {self.num_layers} layers")
        self.depths = depths
        self.batch_size = batch_size
        self.fwd = SequenceForward(llm.engine.model)

    def _batches(self, items: list[tuple[int, list[int], int]]):
        """items: (prompt index, token ids, first scored token); length-sorted batches."""
        items = sorted(items, key=lambda it: len(it[1]))
        for i in range(0, len(items), self.batch_size):
            yield items[i: i + self.batch_size]

    @torch.inference_mode()
    def agreement_and_kl(self, scores: list[dict[int, DepthScore]], items: list[tuple[int, list[int], int]]) -> None:
        for chunk in self._batches(items):
            seqs = SequenceBatch.build([ids for _, ids, _ in chunk], self.fwd.device)
            rows, cols, row_of = _positions_of([(start, len(ids)) for _, ids, start in chunk], self.fwd.device)
            full = F.log_softmax(self.fwd.logits(self.fwd.final_states(seqs, self.num_layers)[rows, cols]), -1)
            full_top = full.argmax(-1)                                               # (n,)
            for depth in self.depths:
                logp = full if depth == self.num_layers else F.log_softmax(
                    self.fwd.logits(self.fwd.final_states(seqs, depth)[rows, cols]), -1)   # (n, V)
                match = (logp.argmax(-1) == full_top).double().cpu()               # (n,)
                kl = (full.exp() * (full - logp)).sum(-1).clamp_min(0).double().cpu()   # (n,)
                per_row = _per_row(row_of, len(chunk), match, kl, torch.ones_like(match))
                # Positions are laid out row by row (`_positions_of`), so each row's bits are one slice.
                bits = "".join("1" if x else "0" for x in match.bool().tolist())
                offset = 0
                for (index, _, _), (m, k, count) in zip(chunk, per_row):
                    s = scores[index][depth]
                    s.matches += round(m)
                    s.kl_sum += k
                    s.positions += round(count)
                    s.match_bits += bits[offset: offset + round(count)]
                    offset += round(count)

    @torch.inference_mode()
    def next_token_matches(self, items: list[tuple[int, list[int], int]], depth: int) -> tuple[int, int]:
        """Teacher-forced at `depth`: (positions whose argmax is the sequence's own next token,
        positions scored), over every item's tokens from its first scored one."""
        matches = positions = 0
        for chunk in self._batches(items):
            seqs = SequenceBatch.build([ids for _, ids, _ in chunk], self.fwd.device)
            rows, cols, _ = _positions_of([(start, len(ids)) for _, ids, start in chunk], self.fwd.device)
            predicted = self.fwd.logits(self.fwd.final_states(seqs, depth)[rows, cols]).argmax(-1)   # (n,)
            matches += int((predicted == seqs.input_ids[rows, cols + 1]).sum())
            positions += int(rows.numel())
        return matches, positions

    @torch.inference_mode()
    def reference_nll(self, scores: list[dict[int, DepthScore]], items: list[tuple[int, list[int], int]]) -> None:
        for chunk in self._batches(items):
            seqs = SequenceBatch.build([ids for _, ids, _ in chunk], self.fwd.device)
            rows, cols, row_of = _positions_of([(start, len(ids)) for _, ids, start in chunk], self.fwd.device)
            targets = seqs.input_ids[rows, cols + 1]                                 # (n,)
            for depth in self.depths:
                logits = self.fwd.logits(self.fwd.final_states(seqs, depth)[rows, cols])
                nll = F.cross_entropy(logits, targets, reduction="none").double().cpu()  # (n,)
                for (index, _, _), (total, count) in zip(chunk, _per_row(row_of, len(chunk), nll, torch.ones_like(nll))):
                    scores[index][depth].nll_sum += total
                    scores[index][depth].ref_tokens += round(count)
