"""Training losses on the answer tokens: next-token CE, self-distillation KL, early-exit CE.

Logits over a 49k vocabulary for every scored token would dominate memory, so the losses take
final hidden states (N, D) and project them through the LM head in chunks, each chunk under
activation checkpointing: only (chunk, V) logits exist at any time, forward or backward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class LossConfig:
    ce_weight: float = field(default=0.1, metadata={
        "help": "weight of next-token cross-entropy on the reference answers"})
    kl_weight: float = field(default=1.0, metadata={
        "help": "weight of self-distillation KL(full-depth base || reduced-depth student)"})
    early_exit_weight: float = field(default=0.0, metadata={
        "help": "weight of the early-exit CE through the shared LM head (0: off)"})
    early_exit_every: int = field(default=4, metadata={
        "help": "early-exit loss on the output of every k-th layer"})
    distill_temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL term"})
    self_distill: bool = field(default=False, metadata={
        "help": "rows that skip layers learn from the student's own full depth (adapter on, no gradient), "
                "which is what evaluation scores them against; rows that keep every layer still learn from the base"})
    loss_chunk_tokens: int = field(default=2048, metadata={"help": "tokens per LM-head chunk in the losses"})

    def __post_init__(self) -> None:
        for name in ("ce_weight", "kl_weight", "early_exit_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.ce_weight + self.kl_weight + self.early_exit_weight == 0:
            raise ValueError("at least one loss weight must be positive")
        if self.early_exit_every < 1:
            raise ValueError("early_exit_every must be >= 1")
        if self.distill_temperature <= 0:
            raise ValueError("distill_temperature must be > 0")
        if self.loss_chunk_tokens < 1:
            raise ValueError("loss_chunk_tokens must be >= 1")

    @property
    def needs_teacher(self) -> bool:
        return self.kl_weight > 0


def _chunk_sums(head: Callable[[torch.Tensor], torch.Tensor], teacher_head: Callable[[torch.Tensor], torch.Tensor],
                hidden: torch.Tensor, labels: torch.Tensor, teacher_hidden: torch.Tensor | None,
                temperature: float) -> torch.Tensor:
    """[sum CE, sum KL] over one chunk. hidden, teacher_hidden: (n, D); labels: (n,)."""
    logits = head(hidden).float()                                                   # (n, V)
    ce = F.cross_entropy(logits, labels, reduction="sum")
    if teacher_hidden is None:
        return torch.stack([ce, torch.zeros_like(ce)])
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_head(teacher_hidden).float() / temperature, dim=-1)  # (n, V)
    student_logp = F.log_softmax(logits / temperature, dim=-1)                      # (n, V)
    # KL(teacher || student) summed over tokens; T^2 keeps gradient size independent of T.
    kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="sum") * temperature ** 2
    return torch.stack([ce, kl])


def chunked_losses(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, labels: torch.Tensor,
                   teacher_hidden: torch.Tensor | None = None,
                   teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   temperature: float = 1.0, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean CE and mean KL (0 without a teacher) over N tokens.

    hidden: (N, D) final (normed) student states; labels: (N,) next tokens; teacher_hidden:
    (N, D) the teacher's final states, projected by `teacher_head` (default: `head`).
    """
    n = hidden.shape[0]
    if n == 0:
        zero = hidden.sum() * 0
        return zero, zero
    teacher_head = teacher_head or head
    total = hidden.new_zeros(2, dtype=torch.float32)
    for start in range(0, n, chunk):
        part = slice(start, start + chunk)
        t_h = None if teacher_hidden is None else teacher_hidden[part].detach()
        args = (head, teacher_head, hidden[part], labels[part], t_h, temperature)
        if torch.is_grad_enabled() and hidden.requires_grad:
            # Recompute the chunk's logits in backward rather than keep (chunk, V) tensors alive.
            total = total + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            total = total + _chunk_sums(*args)
    return total[0] / n, total[1] / n


def target_positions(target_mask: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of scored positions in (B*T) and their labels (the next tokens).

    target_mask: (B, T) bool, True at positions whose next token is scored.
    """
    b, t = input_ids.shape
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)             # (B, T); last col unused
    flat = target_mask.reshape(-1).nonzero().squeeze(1)                              # (N,)
    return flat, next_ids.reshape(-1)[flat]
