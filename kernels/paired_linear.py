"""Weights packed in k-pairs for the small-batch bf16 matmul kernel (paired_linear_cpu.cpp), and its
PyTorch reference.

The kernel multiplies one 64-byte vector of the weight (16 output columns x 2 inputs) by a
broadcast pair of x values per instruction, so it wants W laid out as (N/16, K/2, 16, 2):
each 16-column block a contiguous stream it reads front to back once per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_pairs(w: torch.Tensor) -> torch.Tensor:
    """w (N, K), N a multiple of 16, K even -> (N/16, K/2, 16, 2) contiguous:
    packed[nb, kp, j, t] = w[16 nb + j, 2 kp + t]."""
    n, k = w.shape
    if n % 16 or k % 2:
        raise ValueError(f"pack_pairs needs N % 16 == 0 and K even, got ({n}, {k})")
    return w.reshape(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()     # (N/16, K/2, 16, 2)


def unpack_pairs(w_paired: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_pairs: (N/16, K/2, 16, 2) -> (N, K)."""
    nb, kp, _, _ = w_paired.shape
    return w_paired.permute(0, 2, 1, 3).reshape(nb * 16, kp * 2)                  # (N, K)


def paired_linear_ref(x: torch.Tensor, w_paired: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ W.T + bias with W = unpack_pairs(w_paired): (M, N)."""
    return F.linear(x, unpack_pairs(w_paired), bias)
