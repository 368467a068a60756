"""Grammar masks: -inf to the logits of every token a row's packed bitmask does not allow.

`apply_token_bitmask_ref` defines the semantics (xgrammar's bitmask layout: bit b of int32 word w
allows token 32 w + b); `token_bitmask_op` returns the C++ kernel (`token_bitmask_cpu.cpp`, built
with the other CPU kernels by `cpu_ops.load_cpu_ops`) when it is loaded, else the reference.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """logits (B, V) float, in place; bitmask (B, W) int32; rows (R,) int64: the rows to mask."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask[rows][:, :, None] >> shifts) & 1                                  # (R, W, 32)
    allowed = bits.reshape(len(rows), -1)[:, :vocab].bool()                            # (R, V)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def token_bitmask_op() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]:
    try:
        return torch.ops.adadepth.apply_token_bitmask
    except (AttributeError, RuntimeError):
        return apply_token_bitmask_ref
