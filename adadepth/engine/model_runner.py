"""Owns the model and its KV cache; turns a scheduled batch into sampled tokens."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadepth.engine.block_manager import BlockManager
from adadepth.engine.sampler import Sampler, SamplerOutput
from adadepth.engine.sequence import Sequence
from adadepth.model.adaptive_llama import AdaptiveLlama, ForwardBatch


@dataclass
class StepResult:
    sampled: SamplerOutput
    hidden: torch.Tensor  # (B, D) final normed hidden state of each row's last token


class ModelRunner:
    def __init__(self, model: AdaptiveLlama, block_manager: BlockManager, sampler: Sampler,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.block_manager = block_manager
        self.sampler = sampler
        self.device = device
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        num_slots = block_manager.num_blocks * block_manager.block_size
        # (L, 2, slots, Hkv, Dh): preallocated once; blocks of it are handed out by the block manager.
        self.kv_cache = torch.zeros(model.num_layers, 2, num_slots, cfg.num_key_value_heads, head_dim,
                                    dtype=dtype, device=device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> StepResult:
        """Run one step for seqs (any order; all have a depth). Results come back in seqs' order."""
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].depth)          # deepest first
        sorted_seqs = [seqs[i] for i in order]
        batch = self.prepare_prefill(sorted_seqs) if is_prefill else self.prepare_decode(sorted_seqs)
        hidden = self.model(batch, self.kv_cache)                               # (B, D)
        logits = self.model.compute_logits(hidden)                              # (B, V)
        sampled = self.sampler(logits, sorted_seqs)
        # Undo the depth sort so callers see their own order.
        inverse = [0] * len(order)
        for pos, i in enumerate(order):
            inverse[i] = pos
        return StepResult(
            SamplerOutput([sampled.token_ids[p] for p in inverse], [sampled.logprobs[p] for p in inverse]),
            hidden[torch.tensor(inverse, device=hidden.device)])

    # ---- batch preparation ------------------------------------------------------------
    def _slots(self, seqs: list[Sequence], length: int) -> torch.Tensor:
        """(B, length) cache slots of positions 0..length-1 of each seq (beyond its blocks -> 0)."""
        bs = self.block_manager.block_size
        num_blocks = -(-length // bs)
        table = torch.zeros(len(seqs), num_blocks, dtype=torch.long)
        for i, s in enumerate(seqs):
            blocks = s.block_table[:num_blocks]
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.long)
        pos = torch.arange(length)
        return table[:, pos // bs] * bs + pos % bs                              # (B, length)

    def prepare_prefill(self, seqs: list[Sequence]) -> ForwardBatch:
        lengths = [s.num_tokens for s in seqs]
        t = max(lengths)
        b = len(seqs)
        ids = torch.zeros(b, t, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(s.token_ids, dtype=torch.long)
        lens = torch.tensor(lengths)
        pos = torch.arange(t)
        valid = pos[None, :] < lens[:, None]                                    # (B, T)
        slots = torch.where(valid, self._slots(seqs, t), 0)                     # padding -> scratch slot 0
        causal = pos[None, :, None] >= pos[None, None, :]                       # (1, T, T) query >= key
        mask = causal & valid[:, None, :]                                       # (B, T, S=T)
        return ForwardBatch(
            input_ids=ids.to(self.device), positions=pos.expand(b, t).contiguous().to(self.device),
            slot_mapping=slots.reshape(-1).to(self.device), context_slots=None,
            attn_mask=mask[:, None].to(self.device), active_rows=self.model.active_rows([s.depth for s in seqs]),
            row_depths=[s.depth for s in seqs],
            last_index=(lens - 1).to(self.device))

    def prepare_decode(self, seqs: list[Sequence]) -> ForwardBatch:
        # The newest token (position num_tokens-1) has no KV yet: this step writes it.
        positions = torch.tensor([s.num_tokens - 1 for s in seqs])              # (B,)
        s_max = int(positions.max()) + 1
        ctx = self._slots(seqs, s_max)                                          # (B, S)
        new_slots = ctx[torch.arange(len(seqs)), positions]                     # (B,)
        mask = torch.arange(s_max)[None, :] <= positions[:, None]               # (B, S)
        ids = torch.tensor([s.token_ids[-1] for s in seqs])[:, None]            # (B, 1)
        return ForwardBatch(
            input_ids=ids.to(self.device), positions=positions[:, None].to(self.device),
            slot_mapping=new_slots.to(self.device), context_slots=ctx.to(self.device),
            attn_mask=mask[:, None, None, :].to(self.device),
            active_rows=self.model.active_rows([s.depth for s in seqs]), row_depths=[s.depth for s in seqs],
            last_index=torch.zeros(len(seqs), dtype=torch.long, device=self.device))
