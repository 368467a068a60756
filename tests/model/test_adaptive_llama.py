"""The model's two layer paths: prefix slicing (CPU) and batched-skip kernels (CUDA; their
PyTorch reference on CPU) must agree, for prefill and decode, at mixed depths."""
from __future__ import annotations

import pytest
import torch

from adadepth import LLM, SamplingParams

PROMPTS = ["hello world", "the quick brown fox jumps", "what is 2 + 2?", "def add(a, b):"]


def test_batched_skip_path_matches_slicing_path(tiny_llama, cache_dir):
    llm = LLM(tiny_llama, dtype="float32", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
              max_num_batched_tokens=512)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, depth=d, logprobs=0) for d in (6, 2, 4, 5)]
    sliced = llm.generate(PROMPTS, params)
    llm.engine.model.use_batched_skip_kernels = True
    fused = llm.generate(PROMPTS, params)
    for a, b in zip(sliced, fused):
        assert a.token_ids == b.token_ids
        lp_a = [next(iter(x.values())) for x in a.outputs[0].logprobs]
        lp_b = [next(iter(x.values())) for x in b.outputs[0].logprobs]
        assert torch.allclose(torch.tensor(lp_a), torch.tensor(lp_b), atol=1e-4)


def test_active_rows_counts_follow_rank(tiny_llama, cache_dir):
    llm = LLM(tiny_llama, dtype="float32", cache_dir=cache_dir, num_kv_tokens=1024, max_model_len=128,
              max_num_batched_tokens=256)
    model = llm.engine.model
    counts = model.active_rows([6, 4, 4, 1])
    for layer, n in enumerate(counts):
        assert n == sum(1 for d in (6, 4, 4, 1) if d > model.rank[layer])
    try:
        model.active_rows([1, 6])
    except ValueError as exc:
        assert "sorted" in str(exc)
    else:
        raise AssertionError("unsorted depths must be rejected")


@pytest.mark.parametrize("rope", [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                                  {"rope_type": "linear", "factor": 2.0}])
def test_rope_parameters_match_transformers_rotary_embedding(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from adadepth.model.adaptive_llama import rope_parameters

    kwargs = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=512, rope_theta=50000.0)
    if rope is not None:
        kwargs["rope_scaling"] = rope
    config = LlamaConfig(**kwargs)
    want = LlamaRotaryEmbedding(config=config)
    inv_freq, scaling = rope_parameters(config)
    torch.testing.assert_close(inv_freq.float(), want.inv_freq.float(), rtol=1e-6, atol=0)
    assert scaling == pytest.approx(float(want.attention_scaling))
