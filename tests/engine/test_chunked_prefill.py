"""Chunked prefill: prompts that join running streams in pieces generate exactly what whole
prefills do, steps respect the chunk budget, and decoding streams are never paused."""
from __future__ import annotations

import torch

from adadepth import LLM, SamplingParams
from adadepth.config import SchedulerConfig
from output_helpers import chosen_logprobs

PROMPTS = ["natalia sold clips to 48 of her friends in april, how many?", "the quick brown fox jumps over",
           "def add(a, b): return a + b  # adds two numbers together", "hello world",
           "what is 2 + 2? think step by step and answer with a number"]
DEPTHS = [6, 3, 5, 2, 4]


def make_llm(path, cache_dir, chunk, **kw):
    opts = dict(dtype="float64", cache_dir=cache_dir, num_kv_tokens=4096, max_model_len=256,
                max_num_batched_tokens=512, prefill_chunk_tokens=chunk)
    opts.update(kw)
    return LLM(path, **opts)


def run_joining(llm, params, join_every=3, check=None):
    """The first request alone, then one more every `join_every` steps (each joins while the
    others decode). Returns {request id: (token ids, logprobs)}; `check(engine, decoding, prefilling)`
    runs after each step with the ids that were decoding before it and the number of sequences that
    were waiting for their prefill."""
    engine = llm.engine
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    pending = list(enumerate(zip(PROMPTS, params)))
    step = 0
    while pending or engine.has_unfinished_requests():
        if pending and step % join_every == 0:
            i, (prompt, p) = pending.pop(0)
            engine.add_request(f"r{i}", prompt, p)
        decoding = {s.request_id for s in engine.scheduler.running if s.is_prefilled}
        prefilling = len(engine.scheduler.waiting) + sum(not s.is_prefilled for s in engine.scheduler.running)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
            logprobs.setdefault(out.request_id, []).extend(chosen_logprobs(out) if out.outputs[0].logprobs else [])
        if check is not None:
            check(engine, decoding, prefilling)
        step += 1
    return tokens, logprobs


def test_chunks_generate_what_whole_prefills_do(tiny_llama, cache_dir):
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, depth=d, logprobs=0) for d in DEPTHS]
    budget = 4
    chunked = make_llm(tiny_llama, cache_dir, chunk=budget)
    whole = make_llm(tiny_llama, cache_dir, chunk=0)
    chunk_steps = []

    def check(engine, decoding, prefilling):
        step = engine.last_step
        if step.is_prefill:  # whole prompts run in a step of their own only when nothing decodes
            assert not decoding
            return
        decoded = step.num_seqs
        # Every stream that was decoding got its token this step: chunks never pause them ...
        assert decoded >= len(decoding)
        # ... and a step carries at most `budget` prompt tokens besides them, times the sequences
        # waiting for a prefill per sequence decoding.
        assert step.num_tokens - decoded <= budget * max(1, prefilling / len(decoding))
        if step.num_chunks:
            chunk_steps.append(step)

    got_tokens, got_lp = run_joining(chunked, params, check=check)
    want_tokens, want_lp = run_joining(whole, params)
    assert got_tokens == want_tokens
    for rid in want_lp:
        torch.testing.assert_close(torch.tensor(got_lp[rid]), torch.tensor(want_lp[rid]), rtol=1e-9, atol=1e-9)
    lengths = [len(chunked.tokenizer.encode(p)) for p in PROMPTS[1:]]
    # The prompts that joined running streams came in pieces (a prompt's last token may ride as a
    # decode row once the rest is cached), spread over at least total / budget steps.
    chunk_tokens = sum(step.num_tokens - step.num_seqs for step in chunk_steps)
    assert sum(lengths) - len(lengths) <= chunk_tokens <= sum(lengths)
    assert len(chunk_steps) >= chunk_tokens / (2 * budget)  # one joins at a time: at most 2 wait per decoding
    assert max(lengths) > 2 * budget
    assert chunked.engine.block_manager.usage == 0.0


def test_a_burst_next_to_few_streams_gets_a_larger_budget(tiny_llama, cache_dir):
    """Four prompts arrive while one stream decodes: the first step may carry 4 / 1 times the
    budget, and the burst is in after far fewer steps than a fixed budget takes; the stream still
    gets its token every step."""
    budget = 4
    llm = make_llm(tiny_llama, cache_dir, chunk=budget)
    engine = llm.engine
    engine.add_request("stream", PROMPTS[3], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    engine.step()
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3] + PROMPTS[4:]]
    for i, ids in enumerate(prompts):
        engine.add_request(f"burst{i}", ids, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    steps = []
    while any(not s.is_prefilled for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
        steps.append(engine.last_step)
        assert not engine.last_step.is_prefill and engine.last_step.num_seqs >= 1   # the stream kept decoding
    prompt_tokens = [st.num_tokens - st.num_seqs for st in steps]
    assert prompt_tokens[0] == budget * len(prompts)                            # 4 waiting / 1 decoding
    # The budget shrinks as prompts complete and start decoding (3 waiting / 2 decoding, ...), yet
    # the burst is in well before a fixed budget's steps.
    assert len(steps) < -(-sum(len(p) for p in prompts) // budget) * 2 / 3
    assert max(prompt_tokens) <= engine.config.scheduler.max_num_batched_tokens


def test_chunks_with_preemption_lose_nothing(tiny_llama, cache_dir):
    """A KV cache too small for everyone: decoding sequences and prompts under way are preempted
    and recomputed; every request completes with the tokens of a roomy run."""
    prompts = PROMPTS * 3
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, depth=DEPTHS[i % 5])
              for i in range(len(prompts))]
    want = make_llm(tiny_llama, cache_dir, chunk=0).generate(prompts, params)
    small = make_llm(tiny_llama, cache_dir, chunk=5, num_kv_tokens=192, max_model_len=96, max_num_batched_tokens=96,
                     max_num_seqs=4)
    got = small.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.usage == 0.0


def test_chunk_budget_zero_keeps_prompts_whole(tiny_llama, cache_dir):
    llm = make_llm(tiny_llama, cache_dir, chunk=0)
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, depth=d) for d in DEPTHS]

    def check(engine, decoding, prefilling):
        assert engine.last_step.num_chunks == 0

    run_joining(llm, params, join_every=2, check=check)


def test_default_budget_takes_chat_prompts_whole_next_to_streams(tiny_llama, cache_dir):
    """With the default budget, prompts arriving while a stream decodes join the very next decode
    step whole (one chunk each, all their tokens) and decode from the step after."""
    llm = make_llm(tiny_llama, cache_dir, chunk=SchedulerConfig().prefill_chunk_tokens)
    engine = llm.engine
    engine.add_request("stream", PROMPTS[3], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    engine.step()
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS[:3]]
    for i, ids in enumerate(prompts):
        engine.add_request(f"new{i}", ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    engine.step()
    step = engine.last_step
    assert not step.is_prefill and step.num_chunks == len(prompts)
    assert step.num_tokens - step.num_seqs == sum(len(p) for p in prompts)
    assert all(s.is_prefilled for s in engine.scheduler.running) and not engine.scheduler.waiting
