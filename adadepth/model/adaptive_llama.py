"""A Llama-family decoder whose rows may each run a different subset of layers.

This is the plain model with one feature applied (gpt-fast style): every layer runs only on
the rows (requests) whose depth includes it. Rows arrive sorted by depth, deepest first, so a
layer's active rows are always a contiguous prefix `h[:n]` - no gather, no Python loop over
requests. Rows that skip a layer get its bypass op (identity unless calibration stored one).

Weights are read from a Hugging Face state dict (Llama, Qwen2's q/k/v biases, Mistral), with
q/k/v and gate/up fused into single matmuls (`decoder_layer.py`).
"""
from __future__ import annotations

import torch
from torch import nn

from adadepth.kernels.layer_ops import LayerOps
from adadepth.model.decoder_layer import DecoderLayer, RMSNorm
from adadepth.model.depth_plan import DepthPlan
from adadepth.model.forward_batch import ForwardBatch
from adadepth.model.rope import rope_parameters

__all__ = ["AdaptiveLlama", "layer_kv"]


class AdaptiveLlama(nn.Module):
    def __init__(self, config, plan: DepthPlan):
        super().__init__()
        self.config = config
        self.num_layers = config.num_hidden_layers
        if plan.num_layers != self.num_layers:
            raise ValueError(f"depth plan is for {plan.num_layers} layers, model has {self.num_layers}")
        self.plan = plan
        self.rank = plan.rank
        # An explicit (uninitialized) weight skips nn.Embedding's normal_() init: under the meta
        # device that init goes through torch._refs and imported torch._dynamo, ~1 s of every start.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(self.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bypass = nn.ModuleDict({
            str(layer): nn.Linear(config.hidden_size, config.hidden_size, bias=bias is not None)
            for layer, (_, bias) in plan.bypass.items()})
        self._refresh_bypass_ops()
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.attention_scaling = 1.0
        # The fused gather+RMSNorm / scatter+residual kernels (adadepth.kernels). On by default on
        # CUDA; on CPU their PyTorch reference runs, which tests use to check this path.
        self.use_batched_skip_kernels = False
        # Decode-shaped bf16 steps on CPU: every layer in one C++ call (fused_decode.py; use_ops).
        self.fused_decode = None

    def _refresh_bypass_ops(self) -> None:
        # Per-layer list (None = identity), so the hot loop does no dict lookups.
        self.bypass_ops: list[nn.Module | None] = [
            self.bypass[str(i)] if str(i) in self.bypass else None for i in range(self.num_layers)]

    def use_ops(self, ops: LayerOps | None, paired_weight_dtype: torch.dtype | None = None) -> None:
        """Every layer calls `ops` (same semantics as the references), or the references when None;
        packed matmuls take its small-batch kernels (bf16 skinny: 1-4 rows; paired: up to 256), if it has them.
        `paired_weight_dtype` float16: the paired kernel reads float32 weights from float16 copies
        (`ops.paired_half_weights` must be true; call `round_weights(torch.float16)` first)."""
        if paired_weight_dtype is not None and not (ops is not None and ops.paired_half_weights):
            raise ValueError("these kernels take no float16 copies of float32 weights")
        from adadepth.model.fused_decode import FusedDecode
        from adadepth.model.packed_linear import PackedLinear

        for layer in self.layers:
            layer.ops = ops or LayerOps()
        for module in self.modules():
            if isinstance(module, PackedLinear):
                module.use_skinny(ops.skinny_linear if ops is not None else None)
                module.use_paired(ops.paired_linear if ops is not None else None,
                                  ops.paired_dtypes if ops is not None else (), paired_weight_dtype)
        self.fused_decode = FusedDecode.for_model(self, ops)

    def round_weights(self, dtype: torch.dtype) -> int:
        """Round every matmul weight (each nn.Linear's or PackedLinear's, a tied embedding with its
        lm_head) in place to the nearest value `dtype` holds; returns how many weights. The model
        stays in its dtype: every path (prefill, decode, any kernel) then multiplies by the same
        values, which a float16 copy holds exactly. Norm weights and biases keep full precision."""
        from adadepth.model.packed_linear import PackedLinear

        weights = {id(m.weight): m.weight for m in self.modules() if isinstance(m, (nn.Linear, PackedLinear))}
        with torch.no_grad():
            for w in weights.values():
                w.copy_(w.to(dtype))
        return len(weights)

    def pack_linears(self) -> int:
        """Run every matmul through oneDNN on pre-packed weights (CPU fp32/bf16; see packed_linear)."""
        from adadepth.model.packed_linear import pack_linears

        count = pack_linears(self)
        self._refresh_bypass_ops()
        return count

    @classmethod
    def from_state_dict(cls, config, plan: DepthPlan, state: dict[str, torch.Tensor]) -> "AdaptiveLlama":
        """Build on the meta device (no random init: that alone took seconds), then load weights."""
        with torch.device("meta"):
            model = cls(config, plan)
        model.to_empty(device="cpu")
        model.load_hf_state_dict(state)
        with torch.no_grad():
            for layer, (weight, bias) in plan.bypass.items():
                model.bypass[str(layer)].weight.copy_(weight)
                if bias is not None:
                    model.bypass[str(layer)].bias.copy_(bias)
        model.init_rope()
        return model

    def init_rope(self) -> None:
        inv_freq, self.attention_scaling = rope_parameters(self.config)
        self.inv_freq = inv_freq.float().to(self.embed_tokens.weight.device)

    # ---- weights -----------------------------------------------------------------------
    def load_hf_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a transformers Llama/Qwen2/Mistral state dict in, fusing q/k/v and gate/up."""
        def take(name: str) -> torch.Tensor:
            for prefix in ("model.", ""):
                if prefix + name in state:
                    return state[prefix + name]
            raise KeyError(f"weight {name!r} missing from checkpoint")

        with torch.no_grad():
            self.embed_tokens.weight.copy_(take("embed_tokens.weight"))
            self.norm.weight.copy_(take("norm.weight"))
            head = state.get("lm_head.weight")
            self.lm_head.weight.copy_(head if head is not None else self.embed_tokens.weight)
            for i, layer in enumerate(self.layers):
                p = f"layers.{i}."
                layer.input_layernorm.weight.copy_(take(p + "input_layernorm.weight"))
                layer.post_attention_layernorm.weight.copy_(take(p + "post_attention_layernorm.weight"))
                layer.qkv_proj.weight.copy_(torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
                if layer.qkv_proj.bias is not None:
                    layer.qkv_proj.bias.copy_(torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
                layer.o_proj.weight.copy_(take(p + "self_attn.o_proj.weight"))
                if layer.o_proj.bias is not None:
                    layer.o_proj.bias.copy_(take(p + "self_attn.o_proj.bias"))
                layer.gate_up_proj.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]))
                layer.down_proj.weight.copy_(take(p + "mlp.down_proj.weight"))
                if layer.gate_up_proj.bias is not None:
                    layer.gate_up_proj.bias.copy_(torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")]))
                    layer.down_proj.bias.copy_(take(p + "mlp.down_proj.bias"))

    # ---- forward -----------------------------------------------------------------------
    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (B, T, Dh/2) float32 whatever the model's dtype (angles need the precision);
        Llama's rotate-half uses each frequency for both halves of a head."""
        freqs = positions.float()[..., None] * self.inv_freq                   # (B, T, Dh/2)
        return freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling

    def active_rows(self, row_depths: list[int]) -> list[int]:
        """Per layer, how many leading rows run it. row_depths must be sorted descending."""
        if any(a < b for a, b in zip(row_depths, row_depths[1:])):
            raise ValueError("rows must be sorted by depth, deepest first")
        return [sum(1 for d in row_depths if d > self.rank[layer]) for layer in range(self.num_layers)]

    def forward(self, batch: ForwardBatch, kv_cache: torch.Tensor,
                capture: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Returns the final hidden state of each row's last real token: (B, D).

        kv_cache: (L, 2, num_slots, Hkv, Dh). If `capture` is a list, the residual stream
        entering each layer, then the one leaving the last, are appended to it: L + 1 (B, T, D).
        """
        h = self.embed(batch)
        h = self.run_layers(h, batch, kv_cache, 0, self.num_layers, capture)
        return self.final_hidden(h, batch)

    # The forward pass in three parts, so that a caller (the router's prefill) can stop after the
    # first layers, read features, choose depths, re-sort the rows and continue.
    def embed(self, batch: ForwardBatch) -> torch.Tensor:
        return self.embed_tokens(batch.input_ids)                               # (B, T, D)

    def run_layers(self, h: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor, start: int, stop: int,
                   capture: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run layers [start, stop) on h (B, T, D), each over its active rows; returns h."""
        cos, sin = self.rope(batch.positions)                                   # (B, T, Dh/2) each
        if self.use_batched_skip_kernels:
            h = self._run_layers_batched_skip(h, cos, sin, batch, kv_cache, start, stop, capture)
        elif capture is None and self.fused_decode is not None and self.fused_decode.covers(h, batch):
            h = self.fused_decode(h, cos, sin, batch, kv_cache, start, stop)   # the loop below, in C++
        else:
            for i in range(start, stop):
                if capture is not None:
                    capture.append(h.clone())
                n = batch.active_rows[i]
                bypass = self.bypass_ops[i]
                if bypass is not None and n < h.shape[0]:
                    h[n:] = bypass(h[n:])
                if n == 0:
                    continue
                out = self.layers[i](h[:n], cos[:n], sin[:n], batch, *layer_kv(batch, kv_cache, i))
                if n == h.shape[0]:
                    h = out
                else:
                    h[:n] = out  # rows n: keep their residual stream untouched
        if capture is not None and stop == self.num_layers:
            capture.append(h.clone())
        return h

    def final_hidden(self, h: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        last = h[torch.arange(h.shape[0], device=h.device), batch.last_index]   # (B, D)
        return self.norm(last)

    def _run_layers_batched_skip(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                 batch: ForwardBatch, kv_cache: torch.Tensor, start: int, stop: int,
                                 capture: list[torch.Tensor] | None) -> torch.Tensor:
        """Same result as the slicing path, with each layer's norm fused into the gather of its
        active rows and each residual add fused into the scatter (plus the post-attention norm).

        The active-row lists come from the device (`active_rows`), so the kernels need no host
        sync; the host still knows each layer's row count from the sorted depths, which sizes
        the matmuls.
        """
        from adadepth.kernels.batched_skip import active_rows, gather_rmsnorm, scatter_residual_add

        b, t, d = h.shape
        h_flat = h.reshape(b * t, d).contiguous()                               # (N, D) token rows
        row_depth = batch.depths
        if row_depth is None:
            row_depth = torch.tensor(batch.row_depths, dtype=torch.int32, device=h.device)   # (B,)
        token_depth = row_depth.repeat_interleave(t)                            # (N,)
        for i in range(start, stop):
            layer = self.layers[i]
            if capture is not None:
                capture.append(h_flat.view(b, t, d).clone())
            n = batch.active_rows[i]
            bypass = self.bypass_ops[i]
            if bypass is not None and n < b:
                h_flat[n * t:] = bypass(h_flat[n * t:])
            if n == 0:
                continue
            idx, count = active_rows(token_depth, self.rank[i])
            idx = idx[: n * t]  # host-known count: the first n*t tokens are the active ones
            eps = layer.input_layernorm.eps
            x = gather_rmsnorm(h_flat, idx, count, layer.input_layernorm.weight, eps)       # (n*T, D)
            attn = layer.attention(x.view(n, t, d), cos[:n], sin[:n], batch, *layer_kv(batch, kv_cache, i))
            x = scatter_residual_add(h_flat, attn.reshape(n * t, d), idx, count,
                                     next_weight=layer.post_attention_layernorm.weight, eps=eps)  # (n*T, D)
            scatter_residual_add(h_flat, layer.mlp(x), idx, count)
        return h_flat.view(b, t, d)                                             # (B, T, D)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()                                     # (B, V)


def layer_kv(batch: ForwardBatch, kv_cache: torch.Tensor, layer: int):
    """(k_cache, v_cache, slot_mapping, context_blocks) of one layer, in either cache layout."""
    layout = batch.kv_layout
    if layout is None:
        return kv_cache[layer, 0], kv_cache[layer, 1], batch.slot_mapping, batch.context_blocks
    g, j = layout.group[layer], layout.position[layer]
    blocks = None if batch.context_blocks is None else batch.context_blocks[g]
    return kv_cache[j, 0], kv_cache[j, 1], batch.slot_mapping[g], blocks
