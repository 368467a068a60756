"""Rotary position embedding: the frequencies a config asks for (applied by LayerOps.rope_write_kv)."""
from __future__ import annotations

import torch


def rope_parameters(config) -> tuple[torch.Tensor, float]:
    """(inv_freq (Dh/2,), attention_scaling) as transformers' Llama rotary embedding computes them.

    Scaled variants (llama3, yarn, linear, ...) come from transformers' own table; the plain one
    is computed here, because importing the Llama modeling module for it cost ~1.3 s per start."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config)
        return inv_freq, float(scaling)
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0
