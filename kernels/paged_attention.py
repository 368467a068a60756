"""Decode attention read straight from the paged KV cache: a C++ CPU kernel and its reference.

In a decode step every row has one new token and attends to its whole context, which lives in
KV-cache blocks scattered over the cache (the row's `block_table`). The reference below gathers
those blocks into a dense (n, S, Hkv, Dh) tensor and runs SDPA: a copy of every row's context,
per layer, per step. `paged_attention_cpu.cpp` reads the blocks in place instead.

The C++ kernel is built with the other CPU kernels (cpu_ops.py) and registered as
`torch.ops.adadepth.paged_decode_attention`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_table: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: (n, H, Dh); k/v_cache: (num_blocks, bs, Hkv, Dh); block_table: (n, nblk) long;
    context_lens: (n,) long. Row i attends to its positions [0, context_lens[i]), position s
    being slot s % bs of block block_table[i, s // bs]. Returns (n, H, Dh)."""
    n, num_heads, head_dim = q.shape
    _, bs, num_kv_heads, _ = k_cache.shape
    # Gather whole blocks (bs * Hkv * Dh contiguous values each) rather than single slots: on
    # CPU, index_select over blocks ran ~4x faster than per-slot indexing.
    blocks = block_table.reshape(-1)                                            # (n*nblk,)
    keys = k_cache.index_select(0, blocks).view(n, -1, num_kv_heads, head_dim)   # (n, S, Hkv, Dh)
    values = v_cache.index_select(0, blocks).view(n, -1, num_kv_heads, head_dim)
    mask = torch.arange(keys.shape[1], device=q.device)[None, :] < context_lens[:, None]   # (n, S)
    out = F.scaled_dot_product_attention(
        q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),           # (n, H, 1, Dh), (n, Hkv, S, Dh)
        attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=num_heads != num_kv_heads)
    return out[:, :, 0]                                                         # (n, H, Dh)


def chunk_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    first_position: int, scale: float) -> torch.Tensor:
    """Causal attention of a prompt chunk over its sequence's paged context (chunked prefill).

    q: (c, H, Dh), the chunk's tokens at positions first_position .. first_position + c - 1, whose
    keys/values are already in the cache; k/v_cache: (num_blocks, bs, Hkv, Dh); block_table:
    (nblk,) long, the sequence's blocks. Token i attends to positions [0, first_position + i].
    Returns (c, H, Dh).

    Why not the decode kernel row by row: every row would re-read the whole context, and its
    per-key loop is no match for SDPA's matmuls once a chunk has dozens of rows (a 512-token
    chunk spent half its step there). Here the context is gathered once per chunk.
    """
    c, num_heads, head_dim = q.shape
    _, bs, num_kv_heads, _ = k_cache.shape
    length = first_position + c
    blocks = block_table[: -(-length // bs)]                                    # (nblk',)
    keys = k_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:length]     # (S, Hkv, Dh)
    values = v_cache.index_select(0, blocks).view(-1, num_kv_heads, head_dim)[:length]
    if first_position == 0:  # a whole prompt: plain causal attention (SDPA's causal path, no mask to read)
        mask, causal = None, True
    else:
        query_pos = torch.arange(first_position, length, device=q.device)
        mask = (torch.arange(length, device=q.device)[None, :] <= query_pos[:, None])[None, None]   # (1, 1, c, S)
        causal = False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],  # (1, H|Hkv, c|S, Dh)
        attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=num_heads != num_kv_heads)   # (1, H, c, Dh)
    return out[0].transpose(0, 1)                                               # (c, H, Dh)
