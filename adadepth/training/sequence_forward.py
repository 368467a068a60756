"""Teacher-forced passes of the engine's own model (`AdaptiveLlama`) over whole sequences.

Evaluation and calibration must measure exactly what serving runs: the same fused weights, the
same layer order, the same bypass ops. `final_states` therefore calls `AdaptiveLlama.forward`
itself (every row at one depth) and reads the residual stream of all positions through its
`capture` hook. `run_layers` is the same layer loop, startable at any layer, for calibration's
"what if this layer were dropped too" passes; tests check it against the engine's forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadepth.model.adaptive_llama import AdaptiveLlama
from adadepth.model.forward_batch import ForwardBatch
from adadepth.model.depth_plan import DepthPlan
from adadepth.model.loader import (ResolvedModel, apply_artifact, load_config, load_plan, load_state_dict,
                                   resolve_model)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def load_engine_model(model: str, cache_dir: str, device: str = "cpu", dtype: str = "float32"
                      ) -> tuple[AdaptiveLlama, object, ResolvedModel]:
    """(model, tokenizer, resolved) built the way `LLMEngine` builds them, without a KV cache and
    without storing a heuristic order (a folder without layer_order.json gets early-exit here)."""
    from transformers import AutoTokenizer

    resolved = resolve_model(model, cache_dir)
    config = load_config(resolved.checkpoint_dir)
    state = load_state_dict(resolved.checkpoint_dir)
    if resolved.artifact_dir:
        state = apply_artifact(state, resolved.artifact_dir)
    plan = load_plan(resolved.plan_dir, config.num_hidden_layers)
    net = build_engine_model(config, plan, state, device, dtype)
    return net, AutoTokenizer.from_pretrained(resolved.checkpoint_dir), resolved


def build_engine_model(config, plan: DepthPlan, state: dict[str, torch.Tensor], device: str = "cpu",
                       dtype: str = "float32") -> AdaptiveLlama:
    """An `AdaptiveLlama` with `plan` and the HF weights `state`, as the engine constructs it."""
    if hasattr(AdaptiveLlama, "from_state_dict"):
        net = AdaptiveLlama.from_state_dict(config, plan, state)
    else:  # the engine's older construction path
        net = AdaptiveLlama(config, plan)
        net.load_hf_state_dict(state)
    if dtype == "auto":  # as the engine decides it (ModelConfig.resolved_dtype)
        from adadepth.hardware import auto_dtype

        dtype = auto_dtype(device)
    net = net.to(device=torch.device(device), dtype=DTYPES[dtype]).eval()
    net.inv_freq = net.inv_freq.float()  # rope angles stay fp32 whatever the dtype, as in the engine
    return net


class _KeepLast(list):
    """A `capture` sink that keeps only the newest state: the engine's forward appends the
    residual stream at every layer, and only the one after the last layer is wanted here."""

    def append(self, item) -> None:
        self.clear()
        super().append(item)


@dataclass
class SequenceBatch:
    """Right-padded sequences, every position scored (no KV cache is read)."""
    input_ids: torch.Tensor  # (B, T) long
    lengths: torch.Tensor    # (B,) long
    valid: torch.Tensor      # (B, T) bool

    @classmethod
    def build(cls, sequences: list[list[int]], device) -> "SequenceBatch":
        t = max(len(s) for s in sequences)
        ids = torch.zeros(len(sequences), t, dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        lengths = torch.tensor([len(s) for s in sequences])
        valid = torch.arange(t)[None, :] < lengths[:, None]                         # (B, T)
        return cls(ids.to(device), lengths.to(device), valid.to(device))


class SequenceForward:
    """Run the engine's model teacher-forced over a SequenceBatch at any depth."""

    def __init__(self, model: AdaptiveLlama):
        self.model = model
        cfg = model.config
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward_batch(self, seqs: SequenceBatch, depth: int) -> ForwardBatch:
        b, t = seqs.input_ids.shape
        pos = torch.arange(t, device=self.device)
        causal = pos[None, :, None] >= pos[None, None, :]                           # (1, T, T) query >= key
        mask = causal & seqs.valid[:, None, :]                                      # (B, T, T)
        # Every token writes its k/v to its own scratch slot (slot 0 is never read either).
        slots = torch.arange(1, b * t + 1, device=self.device)                      # (B*T,)
        return ForwardBatch(
            input_ids=seqs.input_ids, positions=pos.expand(b, t).contiguous(), slot_mapping=slots,
            context_blocks=None, attn_mask=mask[:, None], active_rows=self.model.active_rows([depth] * b),
            row_depths=[depth] * b, last_index=seqs.lengths - 1, block_size=1)

    def scratch_kv(self, num_tokens: int) -> torch.Tensor:
        """(L, 2, slots, Hkv, Dh) view of ONE buffer: k/v are written but never read back here."""
        cfg = self.model.config
        buf = torch.empty(num_tokens + 1, cfg.num_key_value_heads, self.head_dim, device=self.device, dtype=self.dtype)
        return buf.expand(self.model.num_layers, 2, *buf.shape)

    @torch.inference_mode()
    def final_states(self, seqs: SequenceBatch, depth: int) -> torch.Tensor:
        """(B, T, D) normed final hidden state at every position, through `AdaptiveLlama.forward`."""
        batch = self.forward_batch(seqs, depth)
        sink = _KeepLast()
        self.model(batch, self.scratch_kv(seqs.input_ids.numel()), capture=sink)
        return self.model.norm(sink[0])

    @torch.inference_mode()
    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(states)                                    # (..., V) float32

    # ---- calibration's startable layer loop -------------------------------------------
    @torch.inference_mode()
    def embed(self, seqs: SequenceBatch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], ForwardBatch, torch.Tensor]:
        """(h0 (B, T, D), (cos, sin), batch, kv) to feed `run_layers`."""
        batch = self.forward_batch(seqs, self.model.num_layers)
        h = self.model.embed_tokens(seqs.input_ids)                                 # (B, T, D)
        return h, self.model.rope(batch.positions), batch, self.scratch_kv(seqs.input_ids.numel())

    @torch.inference_mode()
    def run_layers(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], batch: ForwardBatch,
                   kv: torch.Tensor, start: int, keep: list[bool], bypass: dict[int, torch.nn.Module],
                   capture: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Residual stream after layers start..L-1: layer i runs iff keep[i], else its bypass op
        (if any) or the identity, as `AdaptiveLlama.forward` does. Appends each layer's input to
        `capture` when given."""
        cos, sin = rope
        for i in range(start, self.model.num_layers):
            if capture is not None:
                capture.append(h)
            if keep[i]:
                h = self.model.layers[i](h, cos, sin, batch, kv[i, 0], kv[i, 1])
            elif i in bypass:
                h = bypass[i](h)
        return h
