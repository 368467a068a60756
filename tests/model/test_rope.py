"""Rope frequencies: the same as transformers' Llama rotary embedding, for plain and scaled variants."""
from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "linear", "factor": 2.0}])
def test_rope_parameters_match_transformers_rotary_embedding(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from adadepth.model.rope import rope_parameters

    kwargs = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=512, rope_theta=50000.0)
    if rope is not None:
        kwargs["rope_scaling"] = rope
    config = LlamaConfig(**kwargs)
    want = LlamaRotaryEmbedding(config=config)
    inv_freq, scaling = rope_parameters(config)
    torch.testing.assert_close(inv_freq.float(), want.inv_freq.float(), rtol=1e-6, atol=0)
    assert scaling == pytest.approx(float(want.attention_scaling))
