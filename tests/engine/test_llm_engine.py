"""The engine against transformers: full-depth equality, depth subsets, batch invariance."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from adadepth import LLM, SamplingParams
from adadepth.model.depth_plan import DepthPlan

PROMPTS = ["hello world", "the quick brown fox jumps", "what is 2 + 2?",
           "natalia sold clips to 48 of her friends in april, how many?", "def add(a, b):"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


def make_llm(path, cache_dir, **kw):
    opts = dict(dtype="float64", cache_dir=cache_dir, num_kv_tokens=4096, max_model_len=256,
                max_num_batched_tokens=512)
    opts.update(kw)
    return LLM(path, **opts)


def hf_greedy(model, tok, prompt, n):
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=False)
    return out[0, ids.shape[1]:].tolist()


def hf_subset(path, layers):
    """A plain transformers model holding only `layers` (natural order): the depth-d reference."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    kept = torch.nn.ModuleList(copy.deepcopy(model.model.layers[i]) for i in layers)
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
    model.model.layers = kept
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_full_depth_matches_transformers_generate(fixture, request, cache_dir):
    path = request.getfixturevalue(fixture)
    llm = make_llm(path, cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(path)
    outs = llm.generate(PROMPTS, GREEDY)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(hf, tok, prompt, 16), prompt
        assert out.depth == llm.num_layers


def test_depth_d_equals_plain_model_of_those_layers(tiny_llama, cache_dir):
    llm = make_llm(tiny_llama, cache_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    plan = llm.engine.plan
    for depth in (2, 4):
        layers = plan.layers_for_depth(depth)
        ref = hf_subset(tiny_llama, layers)
        outs = llm.generate(PROMPTS[:3], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, depth=depth))
        for prompt, out in zip(PROMPTS[:3], outs):
            assert out.depth == depth
            assert out.token_ids == hf_greedy(ref, tok, prompt, 12)


def test_mixed_depth_batch_is_batch_invariant(tiny_llama, cache_dir):
    llm = make_llm(tiny_llama, cache_dir)
    depths = [6, 2, 4, 3, 5]
    params = [SamplingParams(max_tokens=14, temperature=0, ignore_eos=True, depth=d) for d in depths]
    together = llm.generate(PROMPTS, params)
    for prompt, p, out in zip(PROMPTS, params, together):
        alone = llm.generate([prompt], p)[0]
        assert out.token_ids == alone.token_ids
        assert out.depth == p.depth


def test_layer_order_nested_and_custom_order(tiny_llama, cache_dir, tmp_path):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, folder)
    DepthPlan(6, [5, 0, 3, 1, 4, 2], source="test").save(str(folder))
    llm = make_llm(str(folder), cache_dir)
    assert llm.engine.plan.layer_order == [5, 0, 3, 1, 4, 2]
    assert llm.engine.plan.layers_for_depth(3) == [0, 3, 5]
    # Nested: each depth's set contains the previous one.
    sets = [set(llm.engine.plan.layers_for_depth(d)) for d in range(1, 7)]
    assert all(a < b for a, b in zip(sets, sets[1:]))
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    out = llm.generate(PROMPTS[1], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, depth=3))[0]
    assert out.token_ids == hf_greedy(hf_subset(tiny_llama, [0, 3, 5]), tok, PROMPTS[1], 10)


def test_bypass_op_replaces_skipped_layer(tiny_llama, cache_dir, tmp_path):
    """A stored bypass map runs in place of a skipped layer; the identity map changes nothing."""
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, folder)
    d = 64
    DepthPlan(6, list(range(6)), bypass={5: (torch.eye(d), None), 4: (torch.eye(d), torch.zeros(d))}).save(str(folder))
    ident = make_llm(str(folder), cache_dir)
    plain = LLM(tiny_llama, dtype="float64", cache_dir=cache_dir, num_kv_tokens=4096, max_model_len=256,
                max_num_batched_tokens=512)
    plain.engine.model.plan = DepthPlan.early_exit(6)
    plain.engine.model.rank = list(range(6))
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, depth=4)
    assert ident.generate(PROMPTS[0], p)[0].token_ids == plain.generate(PROMPTS[0], p)[0].token_ids
    DepthPlan(6, list(range(6)), bypass={5: (torch.eye(d) * 0.0, None)}).save(str(folder))
    zeroed = make_llm(str(folder), cache_dir)
    assert zeroed.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, depth=5))[0].token_ids \
        != ident.generate(PROMPTS[0], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, depth=5))[0].token_ids


def test_continuous_batching_and_preemption_lose_nothing(tiny_llama, cache_dir):
    """A KV cache too small for all requests at once: requests wait (preempted, recomputed), none lost."""
    big = make_llm(tiny_llama, cache_dir)
    small = make_llm(tiny_llama, cache_dir, num_kv_tokens=256, max_model_len=128, max_num_batched_tokens=256)
    prompts = PROMPTS * 4
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, depth=[6, 3, 5, 2][i % 4])
              for i in range(len(prompts))]
    want = big.generate(prompts, params)
    got = small.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert all(len(o.token_ids) == 40 for o in got)
    assert small.engine.scheduler.num_preemptions > 0  # the small cache really did run out
    assert small.engine.block_manager.usage == 0.0      # and every block came back


def test_requests_join_between_steps(tiny_llama, cache_dir):
    llm = make_llm(tiny_llama, cache_dir)
    engine = llm.engine
    alone = {p: llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS[:3]}
    engine.add_request("a", PROMPTS[0], GREEDY)
    done, finished = {}, set()
    for step in range(200):
        if step == 3:
            engine.add_request("b", PROMPTS[1], GREEDY)
        if step == 7:
            engine.add_request("c", PROMPTS[2], GREEDY)
        for out in engine.step():
            done.setdefault(out.request_id, []).extend(out.token_ids)  # each output holds the new tokens
            if out.finished:
                finished.add(out.request_id)
        if len(finished) == 3:
            break
    assert done == {"a": alone[PROMPTS[0]], "b": alone[PROMPTS[1]], "c": alone[PROMPTS[2]]}


def test_step_outputs_carry_only_what_is_new(tiny_llama, cache_dir):
    """A decode step's output holds its one new token (and its text), whatever the length so far;
    folding them gives generate's output, stop-string hold-back included."""
    from adadepth.outputs import merge_delta

    llm = make_llm(tiny_llama, cache_dir)
    engine = llm.engine
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=1, stop=["zzz-never"])
    want = llm.generate(PROMPTS[0], params)[0]
    engine.add_request("d", PROMPTS[0], params)
    whole, sizes = None, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            sizes.append(len(out.outputs[0].token_ids))
            assert out.outputs[0].num_tokens == len(sizes)
            whole = merge_delta(whole, out)
    assert sizes == [1] * 40
    assert whole.outputs[0].token_ids == want.outputs[0].token_ids and whole.outputs[0].text == want.outputs[0].text
    assert whole.outputs[0].logprobs == want.outputs[0].logprobs and whole.finished
