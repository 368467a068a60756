"""The model's two layer paths: prefix slicing (CPU) and batched-skip kernels (CUDA; their
PyTorch reference on CPU) must agree, for prefill and decode, at mixed depths."""
from __future__ import annotations

import torch

from adadepth import LLM, SamplingParams
from output_helpers import chosen_logprobs

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
        lp_a = chosen_logprobs(a)
        lp_b = chosen_logprobs(b)
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

