"""A prefill of newcomers runs packed: one row per token, no padding, every prompt in one step."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adadepth import LLM, SamplingParams
from output_helpers import chosen_logprobs

# Lengths far apart: padded to the longest, the short prompts would have cost ~10x their tokens.
PROMPTS = ["hi", "the quick brown fox jumps over the lazy dog and keeps running far away from home tonight",
           "what is 2 + 2?", "def add(a, b): return a + b  # a longer line of code, with a comment here"]


def make_llm(path, cache_dir, **kw):
    return LLM(path, dtype="float64", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
               max_num_batched_tokens=256, **kw)


def test_prompts_of_any_lengths_and_depths_prefill_in_one_step_as_if_alone(tiny_llama, cache_dir):
    llm = make_llm(tiny_llama, cache_dir)
    engine = llm.engine
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, depth=d, logprobs=0) for d in (6, 3, 5, 2)]
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    for i, (prompt, p) in enumerate(zip(ids, params)):
        engine.add_request(f"r{i}", prompt, p)
    outputs = engine.step()
    step = engine.last_step
    assert step.is_prefill and step.num_seqs == 4 and len(outputs) == 4
    assert step.num_tokens == sum(len(x) for x in ids)  # real tokens only: nothing padded
    assert step.layers_executed == sum(len(x) * p.depth for x, p in zip(ids, params))
    while engine.has_unfinished_requests():
        engine.step()
    together = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, together):
        alone = llm.generate([prompt], p)[0]
        assert out.token_ids == alone.token_ids
        lp = torch.tensor(chosen_logprobs(out), dtype=torch.float64)
        lp_alone = torch.tensor(chosen_logprobs(alone), dtype=torch.float64)
        torch.testing.assert_close(lp, lp_alone, rtol=1e-9, atol=1e-9)


def test_packed_prefill_logits_equal_transformers(tiny_llama, cache_dir):
    """The first sampled token's logprob of each prompt (all prefilled together, full depth)
    equals a plain transformers forward of that prompt alone."""
    llm = make_llm(tiny_llama, cache_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=0))
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logprobs = hf(ids).logits[0, -1].log_softmax(-1)
        token = int(logprobs.argmax())
        assert out.token_ids == [token]
        torch.testing.assert_close(torch.tensor(chosen_logprobs(out)[0], dtype=torch.float64),
                                   logprobs[token], rtol=0, atol=1e-6)  # logits leave the model in float32


def test_prefill_budget_counts_real_tokens(tiny_llama, cache_dir):
    """max_num_batched_tokens bounds the prompt tokens of a prefill step, not padded rows."""
    # The same prompts run twice: without the prefix cache, the second round is a prefill step again.
    llm = make_llm(tiny_llama, cache_dir, enable_prefix_caching=False)
    engine = llm.engine
    long_ids = llm.tokenizer.encode(PROMPTS[1]) * 2                             # ~2x the short ones' total
    short = [llm.tokenizer.encode(p) for p in ("hi", "what is 2 + 2?", "ok then")]
    budget = len(long_ids) + sum(len(x) for x in short)
    assert len(long_ids) * 4 > budget                                           # padded, they would not fit
    engine.config.scheduler.max_num_batched_tokens = budget
    for i, prompt in enumerate([long_ids, *short]):
        engine.add_request(f"b{i}", prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    engine.step()
    assert engine.last_step.is_prefill and engine.last_step.num_seqs == 4
    while engine.has_unfinished_requests():
        engine.step()
    engine.config.scheduler.max_num_batched_tokens = budget - 1
    for i, prompt in enumerate([long_ids, *short]):
        engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    engine.step()
    assert engine.last_step.is_prefill and engine.last_step.num_seqs == 3     # one token over: the last waits
