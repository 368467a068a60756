"""A decode step's layers as one C++ call (kernels/decode_layers_cpu.cpp) where the step allows it.

The Python around a layer's kernels (module calls, slicing, dozens of PyTorch calls) made decode
steps 1.14-1.27x longer at batch 1-64 (benchmarks/results/decode_loop_ab.json). The C++ loop calls the same kernels in the same
order, so its results are those of `AdaptiveLlama.run_layers`' per-layer path, which stays the
reference and the path for every step this one does not cover: steps of several tokens per row,
dtypes without a paired kernel on this CPU, prompt chunks past the paged kernel's limit, bypass
ops, capture, caches not paged by layer groups (the engine always pages them so). bf16 steps take
the skinny, paired and oneDNN matmuls; float32 ones (AVX2 CPUs) the paired kernel from one row and
oneDNN past its limit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from adadepth.model.forward_batch import ForwardBatch
from adadepth.model.packed_linear import PackedLinear


class FusedDecode:
    def __init__(self, model, op: Callable):
        self.model = model
        self.op = op
        first = model.layers[0]
        self.head_dim, self.num_heads, self.num_kv_heads = first.head_dim, first.num_heads, first.num_kv_heads
        self.eps, self.scale = first.input_layernorm.eps, first.scale
        self.linears = [(layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj) for layer in model.layers]
        self._flat = [lin for group in self.linears for lin in group]
        self.skinny_max_rows = min(lin.skinny_max_rows for lin in self._flat)
        self.paired_max_rows = min(lin.paired_max_rows for lin in self._flat)
        self.dtype = model.embed_tokens.weight.dtype
        # float32 has no skinny kernel: the paired one takes every row count up to its limit.
        if self.dtype != torch.bfloat16:
            self.skinny_max_rows = 0
        self._weights: list[torch.Tensor] | None = None
        self._biases: list[torch.Tensor | None] = []
        self._key: tuple | None = None

    @classmethod
    def for_model(cls, model, ops) -> "FusedDecode | None":
        """None unless the C++ loop can serve the model: a model in a dtype the paired kernel takes here
        (bf16 with AVX512-BF16, float32 with AVX2), fused kernels loaded, every matmul packed, one eps.
        (What may change after load, the matmuls' kernels and bypass ops, `covers` checks at every step.)"""
        dtype = model.embed_tokens.weight.dtype
        if ops is None or getattr(ops, "decode_layers", None) is None or dtype not in ops.paired_dtypes:
            return None
        layers = model.layers
        packed = all(isinstance(lin, PackedLinear)
                     for layer in layers for lin in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj))
        eps = {n.eps for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)}
        return cls(model, ops.decode_layers) if packed and len(eps) == 1 else None

    def covers(self, h: torch.Tensor, batch: ForwardBatch) -> bool:
        """Whether this step is one the C++ loop runs exactly as the per-layer path would."""
        if h.dtype != self.dtype or h.device.type != "cpu" or batch.context_blocks is None or batch.kv_layout is None:
            return False
        b, t, _ = h.shape
        if t != 1 or any(op is not None for op in self.model.bypass_ops):
            return False
        if torch.is_grad_enabled():
            return False  # the C++ loop has no backward; PackedLinear takes F.linear then too
        bf16 = self.dtype == torch.bfloat16
        if not all(lin.takes_paired(self.dtype) and (lin.skinny is not None or not bf16) for lin in self._flat):
            return False  # a matmul was sent back to oneDNN (after load, or loaded without the kernels)
        if not all(gate_up.fuse_gate for _, _, gate_up, _ in self.linears):
            return False  # the C++ loop always runs SiLU-and-multiply in oneDNN's epilogues past the paired kernel
        # The layers' ops decide, as they do in the Python loop (a caller may have swapped them).
        ops = self.model.layers[0].ops
        if ops.decode_layers is None:
            return False
        if batch.chunks:  # every chunk's rows must go through the paged kernel, as decode rows do
            if ops.chunk_pairs_limit is None:
                return False
            limit = ops.chunk_pairs_limit(h.dtype, self.head_dim, self.num_heads // self.num_kv_heads)
            return all(count * position + count * (count + 1) // 2 <= limit for _, count, position in batch.chunks)
        return True

    def _weights_key(self) -> list:
        """What identifies the matmul weights' current values, as PackedLinear._weight_key (storage and
        version counter; an in-place resize bumps the version, so the shape adds nothing). It runs every
        decode step, so it reads the Parameters straight from `_parameters` (a Module attribute lookup and a
        method call per matmul cost several times as much)."""
        key = []
        for lin in self._flat:
            w = lin._parameters["weight"]
            key.append(w.data_ptr())
            key.append(None if w.is_inference() else w._version)
        return key

    def _current_weights(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Per layer: norms and each matmul's plain, k-pair and oneDNN weight(s) (kernels/decode_layers_cpu.cpp's
        order), rebuilt when any weight changed (the copies are derived from it)."""
        key = self._weights_key()
        if self._weights is None or key != self._key:
            weights, biases = [], []
            for layer, (qkv, o, gate_up, down) in zip(self.model.layers, self.linears):
                weights += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
                for lin in (qkv, o, gate_up, down):
                    # gate/up: the oneDNN copies of its halves, as PackedLinear.silu_and_mul takes them.
                    packed = list(lin.packed_halves()) if lin is gate_up else [lin.packed_weight()]
                    weights += [lin.weight, lin.paired_weight(), *packed]
                biases += [qkv.bias, o.bias, gate_up.bias, down.bias]
            self._weights, self._biases, self._key = weights, biases, key
        return self._weights, self._biases

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: ForwardBatch,
                 kv_cache: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """h: (B, 1, D) -> (B, 1, D) after layers [start, stop); cos/sin: (B, 1, Dh/2) float32."""
        weights, biases = self._current_weights()
        layout = batch.kv_layout  # the engine's cache: paged by groups of layers (kv_layout.py)
        # slot_mapping (G, N), context_blocks (G, B, nblk): one row per page group.
        return self.op(h, cos, sin, weights, biases, batch.active_rows, start, stop, kv_cache, layout.position,
                       batch.slot_mapping, batch.context_blocks, layout.group, batch.context_lens, self.num_heads,
                       self.num_kv_heads, batch.block_size, self.eps, self.scale, self.skinny_max_rows,
                       self.paired_max_rows)
