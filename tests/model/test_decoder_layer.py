"""Prompt chunks small enough for the paged kernel run through it with the decode rows; larger ones
(and every chunk without the C++ kernels) through one SDPA each. Both routes give the same tokens."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_model import build_tiny_checkpoint

from adadepth import LLM, SamplingParams
from adadepth.model import decoder_layer
from adadepth.model.decoder_layer import DecoderLayer
from output_helpers import chosen_logprobs

PROMPTS = ["hi", "the quick brown fox jumps over the lazy dog and keeps running far away from home tonight",
           "what is 2 + 2?", "def add(a, b): return a + b  # a longer line of code, with a comment here"]


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory) -> str:
    """head_dim 32, two query heads per kv head: a shape the AVX512-BF16 path takes."""
    return build_tiny_checkpoint(str(tmp_path_factory.mktemp("wide-heads")), "llama", num_layers=4,
                                 hidden_size=128, weight_scale=3.0)


def generate_both_routes(path: str, cache_dir: str, dtype: str, steps: int, monkeypatch):
    """(outputs with the chunk limit, outputs through SDPA alone, SDPA calls in each, the SDPA
    calls the limit lets through: a prompt past it, in every layer)."""
    llm = LLM(path, dtype=dtype, cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
              max_num_batched_tokens=256)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, DecoderLayer)]
    ops = layers[0].ops
    assert ops.chunk_pairs_limit is not None, "the C++ CPU kernels did not build (see the warning logged)"
    calls = []
    sdpa = decoder_layer.chunk_attention
    monkeypatch.setattr(decoder_layer, "chunk_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True, logprobs=0)
    via_kernel = llm.generate(PROMPTS, params)
    kernel_calls = len(calls)
    for layer in layers:
        layer.ops = dataclasses.replace(ops, chunk_pairs_limit=None)
    via_sdpa = llm.generate(PROMPTS, params)
    cfg = llm.engine.model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    limit = ops.chunk_pairs_limit(getattr(torch, dtype), head_dim, cfg.num_attention_heads // cfg.num_key_value_heads)
    past = sum(n * (n + 1) // 2 > limit for n in (len(llm.tokenizer.encode(p)) for p in PROMPTS))
    return via_kernel, via_sdpa, kernel_calls, len(calls) - kernel_calls, past * len(layers)


@pytest.mark.parametrize("dtype, steps, tol", [("float32", 5, 1e-4), ("bfloat16", 1, 0.05)])
def test_small_chunks_take_the_paged_kernel_with_the_same_tokens(wide_heads, cache_dir, dtype, steps, tol,
                                                                 monkeypatch):
    """float32: the same tokens and logprobs for 5 steps. bf16: the first token (the prefill's
    logits) and its logprob; later tokens may part ways, as bf16 rounding differs between the two
    routes' sums and a tiny random model's logits have near ties."""
    via_kernel, via_sdpa, kernel_calls, sdpa_calls, past_limit = generate_both_routes(wide_heads, cache_dir, dtype,
                                                                                      steps, monkeypatch)
    assert kernel_calls == past_limit < sdpa_calls  # only prompts past the limit kept SDPA
    for a, b in zip(via_kernel, via_sdpa):
        assert a.token_ids == b.token_ids
        lp_a = torch.tensor(chosen_logprobs(a))
        lp_b = torch.tensor(chosen_logprobs(b))
        torch.testing.assert_close(lp_a, lp_b, rtol=0, atol=tol)


def test_chunks_past_the_limit_keep_sdpa(wide_heads, cache_dir, monkeypatch):
    llm = LLM(wide_heads, dtype="float32", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
              max_num_batched_tokens=256)
    layers = [m for m in llm.engine.model.modules() if isinstance(m, DecoderLayer)]
    limit = layers[0].ops.chunk_pairs_limit
    assert limit is not None and limit(torch.float64, 32, 2) == 0  # the kernel takes float32 and bf16 only
    for layer in layers:  # only prompts of at most 4 tokens (4 * 5 / 2 pairs) fit
        layer.ops = dataclasses.replace(layer.ops, chunk_pairs_limit=lambda dtype, head_dim, group: 10)
    calls = []
    sdpa = decoder_layer.chunk_attention
    monkeypatch.setattr(decoder_layer, "chunk_attention", lambda *a, **k: calls.append(a[0].shape[0]) or sdpa(*a, **k))
    llm.generate(PROMPTS, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    lengths = {len(llm.tokenizer.encode(p)) for p in PROMPTS}
    assert set(calls) == {n for n in lengths if n > 4} and len(calls) == len(layers) * sum(n > 4 for n in lengths)
