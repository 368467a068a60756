"""What a request's sampling settings do to its row of logits, for all rows at once.

Every function takes (B, V) float logits and the batch's sequences (row i belongs to seqs[i]).
Settings are gathered from the sequences into tensors on the host (one pass over the rows);
the work on the logits is whole-batch tensor ops, never a loop of tensor ops per row. Rows that
leave a setting at its no-op value are left out of that setting's work.

Order (as vLLM's sampler): logit bias -> repetition/frequency/presence penalties -> temperature
-> min-p -> top-k/top-p. The penalties and the bias change greedy choices too.
"""
from __future__ import annotations

import itertools

import torch

from adadepth.engine.sequence import Sequence


def _flat_ids(id_lists: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) of every token of every list, as two flat (N,) long tensors."""
    lengths = torch.tensor([len(ids) for ids in id_lists], dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(id_lists)), lengths)                 # (N,)
    tokens = torch.tensor(list(itertools.chain.from_iterable(id_lists)), dtype=torch.long)  # (N,)
    return rows.to(device), tokens.to(device)


def apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """logits[i, t] += bias for every (t, bias) in seqs[i].params.logit_bias (in place)."""
    rows, tokens, biases = [], [], []
    for i, s in enumerate(seqs):
        bias = s.params.logit_bias
        if bias:
            rows.extend([i] * len(bias))
            tokens.extend(bias.keys())
            biases.extend(bias.values())
    if rows:
        index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
        logits.index_put_(index, torch.tensor(biases, dtype=logits.dtype, device=logits.device), accumulate=True)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """Repetition, frequency and presence penalties (in place), with vLLM's semantics:

    - repetition_penalty r: every token seen in the prompt or the output so far has its logit
      divided by r when positive and multiplied by r when negative (transformers does the same);
    - frequency_penalty f, presence_penalty p: logit -= f * count + p * (count > 0), where count
      is how often the token occurs in the output so far (not the prompt), as OpenAI defines them.
    """
    picked = [i for i, s in enumerate(seqs) if s.params.has_penalties]
    if not picked:
        return
    device, (r, v) = logits.device, (len(picked), logits.shape[1])
    sub = [seqs[i] for i in picked]
    index = torch.tensor(picked, device=device)
    rows_logits = logits.index_select(0, index)                                     # (R, V)
    out_rows, out_tokens = _flat_ids([s.output_token_ids for s in sub], device)
    counts = torch.zeros(r, v, dtype=logits.dtype, device=device)
    counts.index_put_((out_rows, out_tokens), torch.ones_like(out_tokens, dtype=logits.dtype), accumulate=True)

    def column(name: str) -> torch.Tensor:                                              # (R, 1)
        return torch.tensor([getattr(s.params, name) for s in sub], dtype=logits.dtype, device=device)[:, None]

    if any(s.params.repetition_penalty != 1 for s in sub):
        seen = counts > 0                                                                # (R, V)
        prompt_rows, prompt_tokens = _flat_ids([s.prompt_token_ids for s in sub], device)
        seen[prompt_rows, prompt_tokens] = True
        rep = column("repetition_penalty")
        penalised = torch.where(rows_logits > 0, rows_logits / rep, rows_logits * rep)
        rows_logits = torch.where(seen, penalised, rows_logits)
    rows_logits -= column("frequency_penalty") * counts + column("presence_penalty") * (counts > 0)
    logits.index_copy_(0, index, rows_logits)


def apply_min_p(scaled: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p x the row's top probability (on logits
    already divided by the temperature). The top token always stays."""
    min_p = [s.params.min_p for s in seqs]
    if not any(min_p):
        return scaled
    probs = torch.softmax(scaled, dim=-1)                                              # (B, V)
    threshold = torch.tensor(min_p, dtype=probs.dtype, device=probs.device)[:, None] * probs.amax(-1, keepdim=True)
    return scaled.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(scaled: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Keep each row's top_k most likely tokens, then the smallest prefix of them whose mass
    reaches top_p (the first token always stays); the rest get -inf."""
    top_k = [s.params.top_k for s in seqs]
    top_p = [s.params.top_p for s in seqs]
    if all(k == -1 for k in top_k) and all(p >= 1.0 for p in top_p):
        return scaled
    vocab = scaled.shape[-1]
    sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)              # (B, V)
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=scaled.device)
    ranks = torch.arange(vocab, device=scaled.device)[None, :]                    # (1, V)
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # A row without top-p keeps its tail even where the cumulative sum rounds up to 1.
    p = torch.tensor([pp if pp < 1 else float("inf") for pp in top_p], device=scaled.device, dtype=probs.dtype)
    drop |= mass_before >= p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, sorted_idx, sorted_logits)
