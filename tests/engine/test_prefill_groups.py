"""Prefill split into length groups: bounded padding, and exactly the tokens of one padded pass."""
from __future__ import annotations

import torch

from adadepth import LLM, SamplingParams
from adadepth.engine.model_runner import prefill_groups


def test_groups_bound_padding_and_cover_every_row_once():
    lengths = [61, 166, 73, 114, 62, 96, 111, 86, 104, 79, 97, 101, 89, 76, 94, 81]
    groups = prefill_groups(lengths, 0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    padded = 0
    for g in groups:
        longest = max(lengths[i] for i in g)
        assert longest * len(g) <= 1.25 * sum(lengths[i] for i in g)
        padded += longest * len(g)
    assert padded < max(lengths) * len(lengths)
    assert prefill_groups(lengths, float("inf")) == [sorted(range(len(lengths)), key=lambda i: -lengths[i])]
    assert prefill_groups([5, 5, 5], 0.0) == [[0, 1, 2]]
    assert len(prefill_groups([40, 4], 0.0)) == 2


def test_grouped_prefill_generates_what_one_padded_pass_does(tiny_llama, cache_dir):
    prompts = ["hi", "the quick brown fox jumps over the lazy dog and keeps running far away",
               "what is 2 + 2?", "def add(a, b): return a + b  # a longer line of code here"]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, depth=d, logprobs=0) for d in (6, 3, 5, 2)]
    kwargs = dict(dtype="float64", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
                  max_num_batched_tokens=512)
    grouped = LLM(tiny_llama, max_prefill_padding=0.0, **kwargs)
    single = LLM(tiny_llama, max_prefill_padding=1e9, **kwargs)
    lengths = [len(grouped.tokenizer.encode(p)) for p in prompts]
    assert len(prefill_groups(lengths, 0.0)) > 1, "the prompts must actually be split"
    for a, b in zip(grouped.generate(prompts, params), single.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        lp_a = torch.tensor([next(iter(x.values())) for x in a.outputs[0].logprobs], dtype=torch.float64)
        lp_b = torch.tensor([next(iter(x.values())) for x in b.outputs[0].logprobs], dtype=torch.float64)
        torch.testing.assert_close(lp_a, lp_b, rtol=1e-9, atol=1e-9)
