"""One decoder layer of a Llama-family model, run on the active rows it is given.

Norms, RoPE + KV write, SiLU-and-multiply and paged decode attention come from the layer's
`LayerOps` (the PyTorch references, or fused kernels with the same semantics); q/k/v and gate/up
are fused into single matmuls.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from adadepth.kernels.layer_ops import LayerOps
from adadepth.kernels.paged_attention import chunk_attention
from adadepth.model.forward_batch import ForwardBatch
from adadepth.model.packed_linear import PackedLinear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or d // self.num_heads
        qkv_bias = bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2"
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.qkv_proj = nn.Linear(d, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, d, bias=bool(getattr(config, "attention_bias", False)))
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.gate_up_proj = nn.Linear(d, 2 * config.intermediate_size, bias=bool(getattr(config, "mlp_bias", False)))
        self.down_proj = nn.Linear(config.intermediate_size, d, bias=bool(getattr(config, "mlp_bias", False)))
        self.scale = 1.0 / math.sqrt(self.head_dim)
        # Norms, RoPE + KV write, SiLU-and-multiply and paged decode attention: the PyTorch
        # references unless the model is given fused kernels (`AdaptiveLlama.use_ops`).
        self.ops = LayerOps()

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor | None = None,
                context_blocks: torch.Tensor | None = None) -> torch.Tensor:
        """h: (n, T, D) active rows; returns the layer output for them (h is not modified).
        cos/sin: (n, T, Dh/2) float32; k/v_cache: (num_slots, Hkv, Dh). slot_mapping and
        context_blocks: this layer's (its page group's); None: the batch's own."""
        ops = self.ops
        x = ops.rms_norm(h, self.input_layernorm.weight, self.input_layernorm.eps)
        attn = self.attention(x, cos, sin, batch, k_cache, v_cache, slot_mapping, context_blocks)
        # The residual add and the next norm in one pass over the rows.
        h, x = ops.add_rms_norm(h, attn, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps)
        return h + self.mlp(x)

    def attention(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor | None = None,
                  context_blocks: torch.Tensor | None = None) -> torch.Tensor:
        """x: (n, T, D) normed input of the active rows -> (n, T, D) attention output (after o_proj)."""
        if slot_mapping is None:
            slot_mapping, context_blocks = batch.slot_mapping, batch.context_blocks
        n, t, _ = x.shape
        qkv = self.qkv_proj(x)                                                  # (n, T, q + 2kv)
        # Rotate q and k in place and write this step's keys/values into the cache (padding
        # tokens land in scratch slot 0), all in one op.
        self.ops.rope_write_kv(qkv, cos, sin, k_cache, v_cache, slot_mapping, self.num_heads, self.num_kv_heads)
        q = qkv[..., : self.q_size].view(n, t, self.num_heads, self.head_dim)  # (n, T, H, Dh)
        if context_blocks is not None:
            # Decode: one new token per row, its context in the paged cache.
            shape = (-1, batch.block_size, self.num_kv_heads, self.head_dim)
            k_blocks, v_blocks = k_cache.view(shape), v_cache.view(shape)      # (num_blocks, bs, Hkv, Dh)
            q = q.reshape(n, self.num_heads, self.head_dim)                     # (n, H, Dh)
            # Prompt chunks small enough for the paged kernel run with the decode rows (every row
            # has its own context length and block table); larger ones get one SDPA each.
            limit = self.ops.chunk_pairs_limit
            limit = 0 if limit is None else limit(q.dtype, self.head_dim, self.num_heads // self.num_kv_heads)
            chunks = [c for c in batch.chunks or ()                             # active rows: whole chunks
                      if c[0] < n and c[1] * c[2] + c[1] * (c[1] + 1) // 2 > limit]
            if not chunks:
                attn = self.ops.paged_attention(q, k_blocks, v_blocks, context_blocks[:n],
                                                batch.context_lens[:n], self.scale)   # (n, H, Dh)
                return self.o_proj(attn.view(n, t, self.q_size))                # (n, T=1, D)
            attn = torch.empty_like(q)
            single = torch.ones(n, dtype=torch.bool)
            for first, count, position in chunks:
                rows = slice(first, first + count)
                attn[rows] = chunk_attention(q[rows], k_blocks, v_blocks, context_blocks[first],
                                             position, self.scale)
                single[rows] = False
            if bool(single.any()):
                idx = single.nonzero()[:, 0].to(q.device)
                attn[idx] = self.ops.paged_attention(q[idx], k_blocks, v_blocks, context_blocks[idx],
                                                     batch.context_lens[idx], self.scale)
            return self.o_proj(attn.view(n, t, self.q_size))                    # (n, T=1, D)
        k = qkv[..., self.q_size: self.q_size + self.kv_size].view(n, t, self.num_kv_heads, self.head_dim)
        v = qkv[..., self.q_size + self.kv_size:].view(n, t, self.num_kv_heads, self.head_dim)   # (n, T, Hkv, Dh)
        attn = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),            # (n, H|Hkv, T, Dh)
            attn_mask=batch.attn_mask[:n], scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads)                     # (n, H, T, Dh)
        attn = attn.transpose(1, 2).reshape(n, t, self.q_size)                  # (n, T, H*Dh)
        return self.o_proj(attn)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj
        if isinstance(gate_up, PackedLinear):  # SiLU and multiply in the matmuls where it can
            return self.down_proj(gate_up.silu_and_mul(x, self.ops.silu_and_mul))   # (..., D) -> (..., I) -> (..., D)
        return self.down_proj(self.ops.silu_and_mul(gate_up(x)))               # (..., 2I) -> (..., I) -> (..., D)
