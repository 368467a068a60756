"""Per-sample layer dropping inside a Hugging Face decoder (Llama, Qwen2, Mistral).

Each decoder layer's `forward` is wrapped on the instance (not the module replaced), so module
and parameter names stay those of the base model: peft targets, saved adapters and the engine's
loader see the usual `model.layers.N.self_attn.q_proj` keys.

For one batch the wrapper gets a `DropDecision`: sample b runs layer l iff keep[b, l]. A layer
runs only on the rows that keep it (gathered), and the others pass their input through
unchanged, as serving skips a layer. Tensor arguments whose first dimension is the batch
(attention mask, position embeddings when per-row) are gathered with the rows.

The decision lives on the host, so every row count is a host int; all layers' row indices go to
the device in ONE copy when the batch starts. The forward therefore never waits for the GPU (a
per-layer copy or `nonzero` would stall the launch queue 30 times a pass).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from adadepth.training.drop_schedule import DropDecision


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a transformers causal LM, through any peft wrapping."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(inner).__name__} has no .model.layers: not a supported decoder")
    return layers


def _gather(value, rows: torch.Tensor, batch_size: int):
    """Select `rows` of every tensor (nested in tuples/lists/dicts) whose dim 0 is the batch."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() > 0 and value.shape[0] == batch_size else value
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, rows, batch_size) for v in value)
    if isinstance(value, dict):
        return {k: _gather(v, rows, batch_size) for k, v in value.items()}
    return value


@dataclass
class LayerDrop:
    """One layer's share of a batch's decision, ready on the device."""
    num_kept: int                 # host int: 0 skips the layer, B runs it on every row
    rows: torch.Tensor | None     # (num_kept,) device indices of the kept rows; None when all are kept
    scale: torch.Tensor | None    # (num_kept,) device factors on the kept rows' update; None when all 1


def plan_drops(decision: DropDecision, device: torch.device) -> list[LayerDrop]:
    """Per layer: kept rows and scales, moved to `device` with one copy for the whole batch."""
    keep, scale = decision.keep, decision.scale                                     # (B, L) host
    b, n = keep.shape
    counts = keep.sum(0).tolist()                                                   # (L,) host ints
    rows = [keep[:, layer].nonzero().squeeze(1) for layer in range(n)]
    scales = [scale[rows[layer], layer] for layer in range(n)]
    needs_scale = [bool((s != 1).any()) for s in scales]
    # One non-blocking copy: staged at once, no wait for the GPU's queue.
    flat = torch.cat([torch.cat(rows).double(), torch.cat(scales).double()]).to(device, non_blocking=True)
    total = sum(counts)
    rows_dev, scales_dev = flat[:total].long(), flat[total:]
    plan, start = [], 0
    for layer in range(n):
        c = counts[layer]
        plan.append(LayerDrop(c, rows_dev[start: start + c] if 0 < c < b else None,
                              scales_dev[start: start + c] if needs_scale[layer] else None))
        start += c
    return plan


class StochasticDepth:
    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.plan: list[LayerDrop] | None = None  # None: every layer runs on every row
        self.capture: list[torch.Tensor] | None = None  # when a list: each layer's output is appended
        # Older transformers (< 4.54) return (hidden, ...) from a layer and index [0] of it.
        self.tuple_outputs = False
        for index, layer in enumerate(self.layers):
            layer.forward = self._wrap(index, layer.forward)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def remove(self) -> None:
        """Restore the layers' own forward methods."""
        for layer in self.layers:
            if "forward" in vars(layer):
                del layer.forward

    @contextmanager
    def dropping(self, decision: DropDecision | None):
        """Within the block, forwards drop layers per sample as `decision` says (None: no drops)."""
        device = next(self.layers.parameters()).device
        previous = self.plan
        self.plan = None if decision is None else plan_drops(decision, device)
        try:
            yield
        finally:
            self.plan = previous

    def _wrap(self, index: int, original):
        def forward(hidden_states: torch.Tensor, *args, **kwargs):
            out = self._forward(index, original, hidden_states, *args, **kwargs)
            if self.capture is not None:
                self.capture.append(out)
            return (out,) if self.tuple_outputs else out
        return forward

    def _forward(self, index: int, original, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.plan is None:
            return self._first(original(hidden_states, *args, **kwargs))
        drop = self.plan[index]
        b = hidden_states.shape[0]
        if drop.num_kept == 0:
            return hidden_states
        if drop.num_kept == b:
            out = self._first(original(hidden_states, *args, **kwargs))
            return out if drop.scale is None else self._rescale(hidden_states, out, drop.scale)
        sub_in = hidden_states.index_select(0, drop.rows)                          # (n, T, D)
        sub_out = self._first(original(sub_in, *_gather(args, drop.rows, b), **_gather(kwargs, drop.rows, b)))
        if drop.scale is not None:
            sub_out = self._rescale(sub_in, sub_out, drop.scale)
        # Out-of-place scatter keeps autograd intact; dropped rows stay exactly their input.
        return hidden_states.index_copy(0, drop.rows, sub_out.to(hidden_states.dtype))

    @staticmethod
    def _rescale(h_in: torch.Tensor, h_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return h_in + (h_out - h_in) * scale.to(h_out.dtype)[:, None, None]           # (n, T, D)

    def _first(self, out):
        if isinstance(out, tuple):
            self.tuple_outputs = True
            return out[0]
        return out
