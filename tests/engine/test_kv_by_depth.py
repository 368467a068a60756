"""KV pages by depth: a depth-d request holds pages of the layer groups it runs only, so at a
fixed cache size shallow requests fit more; outputs do not depend on the grouping."""
from __future__ import annotations

import pytest

from adadepth import LLM, SamplingParams
from adadepth.engine.block_manager import BlockManager
from adadepth.engine.sequence import Sequence
from adadepth.model.kv_layout import KVLayout

PROMPTS = ["natalia sold clips to 48 of her friends in april, how many?", "the quick brown fox jumps over",
           "def add(a, b): return a + b", "hello world", "what is 2 + 2? think step by step"]


def make_llm(path, cache_dir, **kw):
    opts = dict(dtype="float64", cache_dir=cache_dir, num_kv_tokens=4096, max_model_len=256,
                max_num_batched_tokens=512)
    opts.update(kw)
    return LLM(path, **opts)


def test_layout_groups_layers_by_rank():
    rank = [0, 1, 5, 2, 4, 3]  # layer -> rank
    layout = KVLayout.for_ranks(rank, 2)
    assert layout.num_groups == 3
    assert layout.group == (0, 0, 2, 1, 2, 1) and layout.position == (0, 1, 1, 0, 0, 1)
    assert [layout.groups_for_depth(d) for d in range(1, 7)] == [1, 1, 2, 2, 3, 3]
    assert KVLayout.for_ranks(rank, 4).num_groups == 2 and KVLayout.for_ranks(rank, 99).num_groups == 1
    with pytest.raises(ValueError):
        KVLayout.for_ranks(rank, 0)


def test_block_manager_accounts_pages_per_group():
    layout = KVLayout.for_ranks(list(range(30)), 3)
    manager = BlockManager(1 + 100, 16, layout)
    shallow, deep = Sequence("a", None, [1], SamplingParams()), Sequence("b", None, [1], SamplingParams())
    assert manager.ensure_capacity(shallow, 40, 21)                   # 3 pages x 7 groups
    assert [len(t) for t in shallow.block_tables] == [3] * 7
    assert manager.ensure_capacity(deep, 40, 30)                      # 3 pages x 10 groups
    assert len(manager.free_blocks) == 100 - 21 - 30
    assert manager.ensure_capacity(shallow, 48, 21)                   # still 3 pages: nothing new
    assert len(manager.free_blocks) == 49
    assert not manager.ensure_capacity(shallow, 48 + 16 * 8, 21)     # 8 more pages x 7 groups > 49 free ...
    assert len(manager.free_blocks) == 49                             # ... and nothing taken when refused
    manager.trim(deep, 18)                                            # routed lower: 4 groups go back
    assert len(deep.block_tables) == 6 and len(manager.free_blocks) == 49 + 12
    manager.free(shallow)
    manager.free(deep)
    assert manager.usage == 0.0 and shallow.block_tables == [] and deep.block_tables == []


@pytest.mark.parametrize("group_layers", [1, 2, 4])
def test_outputs_do_not_depend_on_the_grouping(tiny_llama, cache_dir, group_layers):
    """Mixed depths, chunked prefill and preemption (a small cache): the same tokens whatever the
    page grouping (6: one group, every request holds every layer's pages, as a plain paged cache)."""
    prompts = PROMPTS * 3
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, depth=[6, 2, 4, 3, 5][i % 5])
              for i in range(len(prompts))]
    small = dict(num_kv_tokens=160, max_model_len=80, max_num_batched_tokens=80, max_num_seqs=6, prefill_chunk_tokens=5)
    want = make_llm(tiny_llama, cache_dir, kv_group_layers=6).generate(prompts, params)
    llm = make_llm(tiny_llama, cache_dir, kv_group_layers=group_layers, **small)
    got = llm.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert llm.engine.block_manager.usage == 0.0


def test_shallow_requests_fit_more_at_a_fixed_cache(tiny_llama, cache_dir):
    """The same cache, one layer per group: requests at depth 4 of 6 run 1.5x as many at once as
    at full depth before the first preemption."""
    def peak_running(depth):
        llm = make_llm(tiny_llama, cache_dir, kv_group_layers=1, num_kv_tokens=256, max_model_len=64,
                       max_num_batched_tokens=1024, max_num_seqs=64, prefill_chunk_tokens=0)
        engine = llm.engine
        for i in range(40):
            engine.add_request(f"r{i}", [5] * 15, SamplingParams(max_tokens=1, temperature=0, depth=depth))
        scheduled = engine.scheduler.schedule()                                # one prefill admission
        return len(scheduled.seqs)

    full, shallow = peak_running(6), peak_running(4)
    assert full == 256 // 16                                                   # one 16-token page per layer
    assert shallow == 24 and shallow / full == 1.5
