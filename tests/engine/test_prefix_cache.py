"""Prefix caching: computed full blocks are shared by hash at the same depth only, counted by
reference, kept after release until their pages are needed (least recently released first), and
prompts that start from cached pages generate exactly what they generate from scratch."""
from __future__ import annotations

import pytest

from adadepth import LLM, SamplingParams
from adadepth.engine.block_manager import BlockManager
from adadepth.engine.sequence import Sequence
from adadepth.model.kv_layout import KVLayout
from output_helpers import chosen_logprobs

BS = 4


def manager(num_blocks: int = 64, enable: bool = True) -> BlockManager:
    # 6 layers in groups of 3: a depth-6 sequence holds pages in 2 groups, a depth-3 one in 1.
    return BlockManager(num_blocks, BS, KVLayout.for_ranks(list(range(6)), 3), enable_prefix_caching=enable)


def seq(tokens: list[int], depth: int = 6, rid: str = "s") -> Sequence:
    return Sequence(rid, None, list(tokens), SamplingParams(max_tokens=4), depth=depth)


def computed(bm: BlockManager, tokens: list[int], depth: int = 6, rid: str = "a") -> Sequence:
    """A sequence whose prompt the engine has just prefilled (every token's KV computed)."""
    s = seq(tokens, depth, rid)
    assert bm.ensure_capacity(s, s.num_tokens, depth)
    s.num_cached_tokens = s.num_tokens
    bm.register_computed(s)
    return s


def test_same_prefix_shares_full_blocks_short_of_the_last_token():
    bm = manager()
    prompt = list(range(100, 110))                                  # 10 tokens: 2 full blocks + 2
    a = computed(bm, prompt)
    b = seq(prompt + [7, 8])                                        # 12 tokens, the same first 10
    assert bm.take_cached_prefix(b) == 2 * BS
    assert b.num_cached_tokens == 8 and [t[:2] for t in b.block_tables] == [t[:2] for t in a.block_tables]
    assert all(bm.ref_count[p] == 2 for t in b.block_tables for p in t)
    # A prompt of exactly 2 full blocks keeps its last token to compute: 1 block from the cache.
    c = seq(prompt[:8])
    assert bm.take_cached_prefix(c) == BS
    # Another first block shares nothing; nor does the same prompt at another depth.
    assert bm.take_cached_prefix(seq([1] + prompt[1:])) == 0
    assert bm.take_cached_prefix(seq(prompt, depth=3)) == 0
    assert bm.num_hit_tokens == 3 * BS and bm.num_queried_tokens == 12 + 8 + 10 + 10


def test_released_blocks_stay_cached_until_their_pages_are_needed():
    bm = manager(num_blocks=1 + 2 * 4)                               # 8 usable pages: 4 blocks of 2 groups
    prompt = list(range(200, 209))                                   # 9 tokens: 2 full blocks + 1
    a = computed(bm, prompt)                                         # holds 6 pages (3 blocks x 2 groups)
    bm.free(a)
    assert bm.num_free_blocks == 8 and len(bm.evictable) == 2       # the 2 full blocks, cached
    b = seq(prompt)
    assert bm.take_cached_prefix(b) == 2 * BS and len(bm.evictable) == 0
    bm.free(b)
    # Needing every page evicts the cached blocks (oldest first): the prefix is gone.
    other = seq(list(range(16)), rid="o")
    assert bm.ensure_capacity(other, 16, 6)
    assert not bm.cached and not bm.evictable and bm.num_free_blocks == 0
    bm.free(other)
    assert bm.take_cached_prefix(seq(prompt)) == 0


def test_held_blocks_are_never_evicted_and_capacity_counts_cached_as_free():
    bm = manager(num_blocks=1 + 2 * 4)
    prompt = list(range(300, 309))
    a = computed(bm, prompt)
    b = seq(prompt, rid="b")
    bm.take_cached_prefix(b)                                         # 2 blocks shared with a
    bm.free(a)                                                       # a's third block (not full) is free
    assert bm.num_free_blocks == 8 - 4
    assert not bm.ensure_capacity(seq([0] * 20, rid="big"), 20, 6)   # 5 blocks x 2 groups: no
    assert all(bm.ref_count[p] == 1 for t in b.block_tables for p in t)


def test_disabled_cache_registers_and_finds_nothing():
    bm = manager(enable=False)
    prompt = list(range(10))
    computed(bm, prompt)
    assert not bm.cached and bm.take_cached_prefix(seq(prompt)) == 0


def make_llm(path, cache_dir, caching: bool, **kw):
    opts = dict(dtype="float64", cache_dir=cache_dir, num_kv_tokens=4096, max_model_len=256,
                max_num_batched_tokens=512, prefill_chunk_tokens=64, block_size=BS, enable_prefix_caching=caching)
    opts.update(kw)
    return LLM(path, **opts)


SYSTEM = "you are a careful assistant that answers questions about arithmetic and words. "
PROMPTS = [SYSTEM + "how many legs do three cats have?", SYSTEM + "spell the word apple backwards",
           SYSTEM + "how many legs do three cats have?"]


def run(llm, prompts, depth):
    """Each prompt after the previous one finished (the next finds the earlier ones cached)."""
    out = {}
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, depth=depth, logprobs=0)
        res = llm.generate([prompt], params)[0]
        out[i] = (res.outputs[0].token_ids, chosen_logprobs(res))
    return out


@pytest.mark.parametrize("depth", [6, 4])
def test_cached_prompts_generate_what_fresh_prompts_do(tiny_llama, cache_dir, depth):
    cached, fresh = make_llm(tiny_llama, cache_dir, True), make_llm(tiny_llama, cache_dir, False)
    got, want = run(cached, PROMPTS, depth), run(fresh, PROMPTS, depth)
    bm = cached.engine.block_manager
    # The shared instruction is cached for the second prompt; the third repeats the first.
    assert bm.num_hit_tokens >= len(cached.tokenizer.encode(PROMPTS[0])) - BS
    assert fresh.engine.block_manager.num_hit_tokens == 0
    for i in got:
        assert got[i][0] == want[i][0]
        assert got[i][1] == pytest.approx(want[i][1], abs=1e-9)


def test_a_cached_prefix_is_not_taken_at_another_depth(tiny_llama, cache_dir):
    llm = make_llm(tiny_llama, cache_dir, True)
    run(llm, PROMPTS[:1], 6)
    bm = llm.engine.block_manager
    run(llm, PROMPTS[:1], 4)
    assert bm.num_hit_tokens == 0
    run(llm, PROMPTS[:1], 6)
    assert bm.num_hit_tokens > 0

