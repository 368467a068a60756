"""The router inside the engine: features from the prefill itself, routed == explicit depth."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from conftest import ORDER, make_router

from adadepth import LLM, SamplingParams
from adadepth.model.depth_plan import DepthPlan
from adadepth.router.depth_grid import DepthGrid
from adadepth.router.difficulty_router import DifficultyRouter
from adadepth.router.feature_extractor import FeatureExtractor
from adadepth.router.prefill_features import PrefillFeatures

PROMPTS = ["hello world", "the quick brown fox jumps", "what is 2 + 2?",
           "natalia sold clips to 48 of her friends in april, how many?", "def add(a, b):"]
PLAN = DepthPlan(6, ORDER, source="test")
OPTS = dict(dtype="float64", num_kv_tokens=4096, max_model_len=256, max_num_batched_tokens=512)


def make_llm(path, cache_dir, router=None, **kw):
    return LLM(path, cache_dir=cache_dir, depth_router=router, **{**OPTS, **kw})


def greedy(n=12, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


class Recorder:
    """Wraps a router: records the features it was given."""

    def __init__(self, router):
        self.router = router
        self.feature_layers = router.feature_layers
        self.seen: list[PrefillFeatures] = []

    def route_features(self, features, seqs):
        self.seen.append(features)
        return self.router.route_features(features, seqs)


def count_layer_calls(model, monkeypatch) -> list[int]:
    """Per layer: rows it was run on (summed over calls)."""
    rows = [0] * model.num_layers
    for i, layer in enumerate(model.layers):
        forward = layer.forward

        def counted(h, *args, _i=i, _f=forward, **kw):
            rows[_i] += h.shape[0]
            return _f(h, *args, **kw)

        monkeypatch.setattr(layer, "forward", counted)
    return rows


def test_features_come_from_the_prefill_with_no_extra_pass(router_ckpt, cache_dir, monkeypatch):
    recorder = Recorder(make_router(PLAN, seed=1))
    llm = make_llm(router_ckpt, cache_dir, router=recorder)
    model = llm.engine.model
    rows = count_layer_calls(model, monkeypatch)
    out = llm.generate(PROMPTS[3], greedy(n=1, quality=0.5))[0]
    depth = out.depth
    # One prefill step: each layer of the chosen depth ran once on the prompt's token rows, no other layer ran.
    ids = llm.tokenizer.encode(PROMPTS[3])
    assert rows == [len(ids) if PLAN.rank[layer] < depth else 0 for layer in range(6)]
    assert out.depth_decision.source == "router"
    # The router saw the residual stream after layers 0..k-1 of that prefill: same as offline extraction.
    features, = recorder.seen
    assert features.lengths.tolist() == [len(ids)]
    offline = FeatureExtractor(model, recorder.feature_layers).extract([ids])
    assert torch.allclose(features.pooled, offline.pooled, atol=1e-10)


@pytest.mark.parametrize("feature_layers,kernels", [(2, False), (0, False), (2, True)])
def test_routed_output_equals_explicit_depth(router_ckpt, cache_dir, feature_layers, kernels):
    router = make_router(PLAN, seed=2, feature_layers=feature_layers)
    # kernels: the CUDA path (its PyTorch reference on CPU), which takes float32 only
    llm = make_llm(router_ckpt, cache_dir, router=router, **(dict(dtype="float32") if kernels else {}))
    llm.engine.model.use_batched_skip_kernels = kernels
    qualities = [0.3, 0.6, 0.9, 0.97, 1.0]
    routed = llm.generate(PROMPTS, [greedy(quality=q) for q in qualities])
    assert all(o.depth_decision.source == "router" for o in routed)
    assert len({o.depth for o in routed}) > 1  # the batch really mixed depths
    explicit = llm.generate(PROMPTS, [greedy(depth=o.depth) for o in routed])
    for r, e in zip(routed, explicit):
        assert r.token_ids == e.token_ids
        assert e.depth_decision.source == "request"
        assert r.depth_decision.predicted_agreement is not None and r.depth_decision.quality is not None
    # One router call for the whole prefill: every prompt runs in one packed step; quality 1.0 needs
    # none (full depth, decided at admission).
    assert router.stats.prompts == len(PROMPTS) - 1 and router.stats.calls == 1
    assert routed[-1].depth == PLAN.num_layers and routed[-1].depth_decision.predicted_agreement == 1.0


def test_full_quality_skips_the_router_pass(router_ckpt, cache_dir, monkeypatch):
    """quality 1.0: only full depth is sure to agree with full depth, so the prompt is prefilled once,
    at full depth, with no pass through the router's feature layers; tokens as an explicit full depth."""
    router = make_router(PLAN, agreements=[0.2, 0.5, 0.8, 1.0])   # even a partial depth predicted at 1.0
    llm = make_llm(router_ckpt, cache_dir, router=router, prefill_chunk_tokens=4)
    rows = count_layer_calls(llm.engine.model, monkeypatch)
    full = llm.generate(PROMPTS, [greedy(n=4, quality=1.0) for _ in PROMPTS])
    assert [o.depth for o in full] == [PLAN.num_layers] * len(PROMPTS)
    assert all(o.depth_decision.source == "router" and o.depth_decision.predicted_agreement == 1.0 for o in full)
    assert router.stats.calls == 0
    prompt_tokens = sum(len(llm.tokenizer.encode(p)) for p in PROMPTS)
    assert rows == [prompt_tokens + 3 * len(PROMPTS)] * PLAN.num_layers   # each token once per layer
    explicit = llm.generate(PROMPTS, [greedy(n=4, depth=PLAN.num_layers) for _ in PROMPTS])
    assert [o.token_ids for o in full] == [o.token_ids for o in explicit]


def test_mixed_routed_and_explicit_batch(router_ckpt, cache_dir):
    router = make_router(PLAN, agreements=[0.2, 0.5, 0.8, 0.95])
    llm = make_llm(router_ckpt, cache_dir, router=router)
    params = [greedy(quality=0.5), greedy(depth=1), greedy(quality=0.99), greedy(depth=4, quality=0.1),
              greedy(quality=0.1), greedy()]
    prompts = PROMPTS + PROMPTS[:1]
    together = llm.generate(prompts, params)
    assert [o.depth for o in together] == [3, 1, 6, 4, 2, 6]
    assert [o.depth_decision.source for o in together] == ["router", "request", "router", "request", "router",
                                                           "default"]
    assert together[0].depth_decision.predicted_agreement == pytest.approx(0.5, abs=1e-4)
    plain = make_llm(router_ckpt, cache_dir, router=None)
    for prompt, out in zip(prompts, together):
        assert out.token_ids == plain.generate(prompt, greedy(depth=out.depth))[0].token_ids


def test_preemption_keeps_the_decided_depth(router_ckpt, cache_dir):
    router = make_router(PLAN, seed=4)
    small = make_llm(router_ckpt, cache_dir, router=router, num_kv_tokens=256, max_model_len=128,
                     max_num_batched_tokens=256)
    prompts = PROMPTS * 4
    params = [SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, quality=[0.3, 0.7, 0.9, 0.99][i % 4])
              for i in range(len(prompts))]
    got = small.generate(prompts, params)
    assert small.engine.scheduler.num_preemptions > 0
    assert router.stats.prompts == len(prompts)  # routed once each, never again on recompute
    plain = make_llm(router_ckpt, cache_dir)
    want = plain.generate(prompts, [dataclasses.replace(p, quality=None, depth=o.depth) for p, o in zip(params, got)])
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_permuted_batch_equals_a_fresh_one(router_ckpt, cache_dir):
    llm = make_llm(router_ckpt, cache_dir)
    engine = llm.engine
    for i, p in enumerate(PROMPTS[:4]):
        engine.add_request(f"r{i}", p, greedy(depth=[6, 5, 3, 2][i]))
    seqs = engine.scheduler.schedule().seqs
    runner = engine.runner
    pieces = [(s, 0, s.num_tokens) for s in seqs]                              # whole prompts, packed
    batch = runner.prepare_tokens(pieces, [s.depth for s in seqs])
    perm = [2, 0, 3, 1]
    depths = [5, 4, 4, 2]
    first = [0]
    for s in seqs:
        first.append(first[-1] + s.num_tokens)
    rows = [r for p in perm for r in range(first[p], first[p + 1])]           # each prompt's token rows
    fresh = runner.prepare_tokens([pieces[p] for p in perm], depths)
    permuted = runner._permute_rows(batch, rows, [d for p, d in zip(perm, depths) for _ in range(seqs[p].num_tokens)])
    for f in dataclasses.fields(fresh):
        if f.name == "chunks":  # row spans: the caller sets them for the new order
            continue
        a, b = getattr(fresh, f.name), getattr(permuted, f.name)
        assert (torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b), f.name


def test_llm_loads_the_router_stored_with_the_model(router_ckpt, cache_dir, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(router_ckpt, folder)
    stored = make_router(PLAN, agreements=[0.2, 0.5, 0.8, 0.95])
    stored.save(str(folder))
    llm = LLM(str(folder), cache_dir=cache_dir, **OPTS)
    assert isinstance(llm.engine.depth_router, DifficultyRouter)
    out = llm.generate(PROMPTS[0], greedy(n=2, quality=0.8))[0]
    assert (out.depth, out.depth_decision.source) == (4, "router")
    # An explicit router overrides the stored one.
    other = make_router(PLAN, agreements=[0.9, 0.92, 0.94, 0.96])
    assert LLM(str(folder), cache_dir=cache_dir, depth_router=other, **OPTS).generate(
        PROMPTS[0], greedy(n=2, quality=0.8))[0].depth == 2
    # A router trained for another layer order is refused.
    DepthPlan(6, [0, 1, 2, 3, 4, 5], source="other").save(str(folder))
    with pytest.raises(ValueError, match="layer order"):
        LLM(str(folder), cache_dir=cache_dir, **OPTS)


def test_router_depth_must_cover_its_feature_layers(router_ckpt, cache_dir):
    # A (broken) router claiming k = 3 with a grid starting at 2: layer 5 is not in the depth-2 set.
    router = make_router(PLAN, agreements=[0.9, 0.92, 0.94, 0.96], grid=DepthGrid.default(6), feature_layers=3)
    llm = make_llm(router_ckpt, cache_dir, router=router)
    with pytest.raises(ValueError, match="feature layers"):
        llm.generate(PROMPTS[0], greedy(n=1, quality=0.5))


def test_server_routes_by_default_when_the_model_has_a_router():
    from adadepth.server.config import ROUTER_DEFAULT_QUALITY, ServerConfig

    assert ServerConfig().for_router(True).default_quality == ROUTER_DEFAULT_QUALITY == 0.9
    assert ServerConfig().for_router(False).default_quality is None
    assert ServerConfig(default_quality=0.7).for_router(True).default_quality == 0.7


def test_chunked_router_pass_picks_the_whole_prompts_depth(router_ckpt, cache_dir):
    """Prompts routed while others decode: their features are pooled chunk by chunk over the
    feature layers, then the prompt is prefilled at the picked depth. Same depth, same predicted
    agreement and same tokens as a whole routed prefill."""
    qualities = [0.3, 0.6, 0.9, 0.97, 0.5]

    def run(chunk):
        router = make_router(PLAN, seed=2)
        llm = make_llm(router_ckpt, cache_dir, router=router, prefill_chunk_tokens=chunk)
        engine, outs, pooled_in_pieces = llm.engine, {}, False
        for i, (prompt, q) in enumerate(zip(PROMPTS, qualities)):
            engine.add_request(f"r{i}", prompt, greedy(n=10, quality=q))
            for _ in range(2):  # the next one joins while this one decodes
                for out in engine.step():
                    outs.setdefault(out.request_id, []).append(out)
                pooled_in_pieces |= any(s.router_features is not None for s in engine.scheduler.running)
        while engine.has_unfinished_requests():
            for out in engine.step():
                outs.setdefault(out.request_id, []).append(out)
        assert router.stats.prompts == len(PROMPTS)
        assert pooled_in_pieces == (chunk > 0)
        return {rid: ([t for o in os for t in o.token_ids], os[0].depth_decision) for rid, os in outs.items()}

    chunked, whole = run(2), run(0)
    assert chunked.keys() == whole.keys() == {f"r{i}" for i in range(len(PROMPTS))}
    for rid in whole:
        (tokens_c, dec_c), (tokens_w, dec_w) = chunked[rid], whole[rid]
        assert dec_c.depth == dec_w.depth and dec_c.source == "router"
        assert dec_c.predicted_agreement == pytest.approx(dec_w.predicted_agreement, abs=1e-6)
        assert tokens_c == tokens_w
    assert len({d.depth for _, d in whole.values()}) > 1


def test_load_policy_keeps_floors_and_explicit_depths(router_ckpt, cache_dir):
    """--depth-policy load: an idle server gives routed requests full depth (source "load");
    objectives no step can meet leave them at their floors (what `min` gives); an explicit depth
    is never changed."""
    prompts = PROMPTS[:3] + PROMPTS[:1]
    params = [greedy(n=4, quality=q) for q in (0.1, 0.5, 0.7)] + [greedy(n=4, depth=2)]

    def run(**kw):
        router = make_router(PLAN, agreements=[0.2, 0.5, 0.8, 0.95])
        return make_llm(router_ckpt, cache_dir, router=router, **kw).generate(prompts, params)

    floors = run()
    assert [o.depth for o in floors] == [2, 3, 4, 2] and floors[0].depth_decision.source == "router"
    roomy = run(depth_policy="load")
    assert [o.depth for o in roomy] == [6, 6, 6, 2]
    assert [o.depth_decision.source for o in roomy] == ["load"] * 3 + ["request"]
    assert roomy[0].depth_decision.predicted_agreement == 1.0
    tight = run(depth_policy="load", slo_itl_ms=1e-6)
    assert [o.depth for o in tight] == [2, 3, 4, 2]
    assert [o.depth_decision.source for o in tight] == ["router"] * 3 + ["request"]
    assert [o.token_ids for o in tight] == [o.token_ids for o in floors]
