"""Per-sample layer dropping inside a Hugging Face decoder (Llama, Qwen2, Mistral).

Each decoder layer's `forward` is wrapped on the instance (not the module replaced), so module
and parameter names stay those of the base model: peft targets, saved adapters and the engine's
loader see the usual `model.layers.N.self_attn.q_proj` keys.

For one batch the wrapper gets a `DropDecision`: sample b runs layer l iff keep[b, l]. A layer
runs only on the rows that keep it (gathered), and the others pass their input through
unchanged, as serving skips a layer. Tensor arguments whose first dimension is the batch
(attention mask, position embeddings when per-row) are gathered with the rows.
"""
from __future__ import annotations

from contextlib import contextmanager

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
    """Select `rows` of every tensor (nested in tuples/lists) whose dim 0 is the batch."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() > 0 and value.shape[0] == batch_size else value
    if isinstance(value, (tuple, list)):
        return type(value)(_gather(v, rows, batch_size) for v in value)
    if isinstance(value, dict):
        return {k: _gather(v, rows, batch_size) for k, v in value.items()}
    return value


class StochasticDepth:
    def __init__(self, model: nn.Module):
        self.layers = decoder_layers(model)
        self.decision: DropDecision | None = None  # None: every layer runs on every row
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
        previous, self.decision = self.decision, decision
        try:
            yield
        finally:
            self.decision = previous

    def _wrap(self, index: int, original):
        def forward(hidden_states: torch.Tensor, *args, **kwargs):
            out = self._forward(index, original, hidden_states, *args, **kwargs)
            if self.capture is not None:
                self.capture.append(out)
            return (out,) if self.tuple_outputs else out
        return forward

    def _forward(self, index: int, original, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        decision = self.decision
        if decision is None:
            return self._first(original(hidden_states, *args, **kwargs))
        b = hidden_states.shape[0]
        # Decisions live on the CPU: counting rows there costs no device sync.
        keep = decision.keep[:, index]                                              # (B,)
        scale = decision.scale[:, index]                                            # (B,)
        needs_scale = not bool((scale == 1).all())
        num_kept = int(keep.sum())
        if num_kept == 0:
            return hidden_states
        if num_kept == b:
            out = self._first(original(hidden_states, *args, **kwargs))
            return self._rescale(hidden_states, out, scale) if needs_scale else out
        rows = keep.nonzero().squeeze(1).to(hidden_states.device)                   # (n,)
        sub_in = hidden_states.index_select(0, rows)                                # (n, T, D)
        sub_out = self._first(original(sub_in, *_gather(args, rows, b), **_gather(kwargs, rows, b)))
        if needs_scale:
            sub_out = self._rescale(sub_in, sub_out, scale[keep])
        # Out-of-place scatter keeps autograd intact; dropped rows stay exactly their input.
        return hidden_states.index_copy(0, rows, sub_out.to(hidden_states.dtype))

    @staticmethod
    def _rescale(h_in: torch.Tensor, h_out: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scale = scale.to(device=h_out.device, dtype=h_out.dtype)
        return h_in + (h_out - h_in) * scale[:, None, None]                         # (n, T, D)

    def _first(self, out):
        if isinstance(out, tuple):
            self.tuple_outputs = True
            return out[0]
        return out
