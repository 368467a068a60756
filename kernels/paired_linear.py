"""Weights packed for the small-batch matmul kernel (paired_linear_cpu.cpp), and its PyTorch reference.

bf16: the kernel multiplies one 64-byte vector of the weight (16 output columns x 2 inputs) by a
broadcast pair of x values per instruction, so it wants W in k-pairs, (N/16, K/2, 16, 2).
float32: one 32-byte vector (8 output columns of one input) by a broadcast x value, so W in
8-column blocks, (N/8, K, 8), stored in float32 or (CPUs with F16C) float16, widened in registers.
Either way each column block is a contiguous stream it reads front to back once per step.
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


def pack_blocks(w: torch.Tensor) -> torch.Tensor:
    """w (N, K), N a multiple of 8 -> (N/8, K, 8) contiguous: packed[nb, k, j] = w[8 nb + j, k]."""
    n, k = w.shape
    if n % 8:
        raise ValueError(f"pack_blocks needs N % 8 == 0, got ({n}, {k})")
    return w.reshape(n // 8, 8, k).permute(0, 2, 1).contiguous()                  # (N/8, K, 8)


def unpack_blocks(w_blocks: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_blocks: (N/8, K, 8) -> (N, K)."""
    nb, k, _ = w_blocks.shape
    return w_blocks.permute(0, 2, 1).reshape(nb * 8, k)                            # (N, K)


def pack_for_kernel(w: torch.Tensor, weight_dtype: torch.dtype | None = None) -> torch.Tensor:
    """The kernel's copy of w: k-pairs for bf16, 8-column blocks for float32; `weight_dtype`
    float16 stores a float32 weight's blocks in float16 (2 bytes a weight; exact when the weight's
    values are float16 values, as `round_weights` makes them)."""
    if w.dtype == torch.bfloat16:
        return pack_pairs(w)
    return pack_blocks(w if weight_dtype is None else w.to(weight_dtype))


def paired_linear_ref(x: torch.Tensor, w_paired: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (M, K) @ W.T + bias with W unpacked from either layout (by its rank): (M, N). A float16
    copy serving float32 x is widened (exactly) to float32 first."""
    w = unpack_pairs(w_paired) if w_paired.dim() == 4 else unpack_blocks(w_paired)
    return F.linear(x, w.to(x.dtype), bias)
