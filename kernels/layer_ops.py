"""The small ops of a decoder layer, as PyTorch references, and the set a model runs with.

`LayerOps` names the five ops a layer calls besides its matmuls. Its defaults are the PyTorch
references below, which define the semantics (and run on any device and dtype); `load_cpu_ops`
(cpu_ops.py) returns the same set backed by the fused C++ kernels. Math runs in float32 (float64
for float64 tensors) and is rounded once to the tensor's dtype, so a bfloat16 model keeps its
norms, rotations and softmax in float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .paged_attention import paged_decode_attention_ref


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: (..., D) -> x * rsqrt(mean(x^2) + eps) * weight, same shape and dtype."""
    xf = x.to(_acc(x))
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)
    return out.to(x.dtype)


def add_rms_norm_ref(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(h + delta, rms_norm(h + delta)); the norm reads the sum as rounded to h's dtype, which is
    what the next layer sees. Neither input is modified."""
    total = (h.to(_acc(h)) + delta.to(_acc(h))).to(h.dtype)
    return total, rms_norm_ref(total, weight, eps)


def rope_write_kv_ref(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int) -> None:
    """Rotate q and k inside qkv in place (Llama's rotate-half), then write k and v to the cache.

    qkv: (..., (H + 2 Hkv) * Dh) contiguous, N tokens in all; cos/sin: (N, Dh/2) float32, already
    scaled by the rope's attention scaling; k/v_cache: (slots, Hkv, Dh); slot_mapping: (N,) long.
    """
    head_dim = k_cache.shape[-1]
    half = head_dim // 2
    rows = qkv.view(-1, num_heads + 2 * num_kv_heads, head_dim)                  # (N, H + 2Hkv, Dh)
    n = rows.shape[0]
    qk = rows[:, : num_heads + num_kv_heads].to(_acc(qkv))                      # (N, H + Hkv, Dh)
    x1, x2 = qk[..., :half], qk[..., half:]
    c, s = cos.view(n, 1, half).to(qk.dtype), sin.view(n, 1, half).to(qk.dtype)
    rows[:, : num_heads + num_kv_heads] = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(qkv.dtype)
    slots = slot_mapping[:n]
    k_cache.index_copy_(0, slots, rows[:, num_heads: num_heads + num_kv_heads])
    v_cache.index_copy_(0, slots, rows[:, num_heads + num_kv_heads:])


def silu_and_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: (..., 2I) -> silu(gate) * up, (..., I)."""
    gate, up = gate_up.to(_acc(gate_up)).chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


@dataclass(frozen=True)
class LayerOps:
    """What a decoder layer calls besides its oneDNN matmuls (each with its reference's semantics)."""
    rms_norm: Callable = rms_norm_ref
    add_rms_norm: Callable = add_rms_norm_ref
    rope_write_kv: Callable = rope_write_kv_ref
    silu_and_mul: Callable = silu_and_mul_ref
    # The reference decode attention gathers whole blocks (masked, but 0 * NaN is NaN), so the KV
    # cache starts zeroed (ModelRunner); the kernel reads only each row's context.
    paged_attention: Callable = paged_decode_attention_ref
    # bf16 matmuls of at most `PackedLinear.skinny_max_rows` rows (decode at batch 1-4), reading
    # the plain weight at the memory's pace (skinny_linear_cpu.cpp; reference: F.linear). None:
    # every matmul goes through oneDNN.
    skinny_linear: Callable | None = None
    # Matmuls of up to `PackedLinear.paired_max_rows` rows (decode steps; bf16 from 5 rows, float32
    # from 1) from a copy of the weight packed for it: k-pairs (bf16) or 8-column blocks (float32)
    # (paired_linear_cpu.cpp; reference: paired_linear_ref). None: oneDNN.
    paired_linear: Callable | None = None
    # The dtypes `paired_linear` takes on this CPU: bf16 (AVX512-BF16; rows past the skinny kernel's)
    # and float32 (AVX2 and FMA; every row count up to the limit).
    paired_dtypes: tuple[torch.dtype, ...] = ()
    # Whether float32 products also take a float16 copy of the weight (AVX2, FMA and F16C): half the
    # bytes a decode step reads, each weight widened exactly to float32 in registers.
    paired_half_weights: bool = False
    # (dtype, head_dim, query heads per kv head) -> the most (query, key) position pairs a prompt
    # chunk may have for its rows to go through `paged_attention` like decode rows (one call for the
    # whole step) instead of one SDPA per chunk. Where the paged kernel's cost per pair is SDPA's or
    # lower (benchmarks/results/chunk_attention.json). None: every chunk through SDPA (the reference
    # decode attention gathers each row's whole context, so it is no way to run a chunk).
    chunk_pairs_limit: Callable | None = None
    # A decode-shaped step's whole layer loop in one call (bf16 or float32, where `paired_linear`
    # takes the dtype), running the kernels above in the reference loop's order
    # (decode_layers_cpu.cpp; used through adadepth.model.fused_decode). None: the loop runs in Python.
    decode_layers: Callable | None = None
