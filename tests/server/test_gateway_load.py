"""The gateway answers `quality` from the router's calibration curve, and under
`--depth-policy load` picks the deepest tier at or above a request's floor that is not queueing
(read from each tier's /metrics); fake tiers stand in for vLLM."""
from __future__ import annotations

import contextlib
import json
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from test_gateway import ORDER, serve_app

from adadepth.model.depth_plan import DepthPlan
from adadepth.outputs import DepthDecision
from adadepth.sampling_params import SamplingParams
from adadepth.server.backend_map import BackendMap
from adadepth.server.config import ServerConfig
from adadepth.server.depth_policy import DEPTH_CURVE_FILE, DepthCurvePolicy
from adadepth.server.gateway import Gateway, GatewayModel, build_gateway_app
from adadepth.server.tier_selector import TierSelector, waiting_requests
from conftest import engine_config
from tiny_model import build_tiny_checkpoint

CURVE = {2: 0.55, 3: 0.62, 4: 0.74, 5: 0.86, 6: 1.0}


def test_curve_policy_picks_the_smallest_depth_reaching_the_quality():
    policy = DepthCurvePolicy(CURVE, 6)
    pick = lambda q: policy.choose(None, SamplingParams(quality=q))  # noqa: E731
    assert [pick(q).depth for q in (0.1, 0.55, 0.6, 0.7, 0.9, 1.0)] == [2, 2, 3, 4, 6, 6]
    assert (pick(0.7).source, pick(0.7).predicted_agreement, pick(0.7).quality) == ("router", 0.74, 0.7)
    assert policy.choose(None, SamplingParams()).source == "default" and policy.choose(None, SamplingParams()).depth == 6
    with pytest.raises(ValueError):
        DepthCurvePolicy({2: 0.5, 4: 0.7}, 6)


def test_tier_selector_goes_deeper_only_while_the_deeper_tier_is_idle():
    backends = BackendMap.parse(json.dumps({"2": "http://a:1", "4": "http://b:1", "6": "http://c:1"}), 6)
    tiers = TierSelector(backends, load_aware=True, curve=CURVE)
    routed = DepthDecision(3, 6, "router", 0.6, 0.62)
    assert tiers.pick(routed)[0].depth == 4                     # nothing read yet: the floor's tier
    tiers.waiting.update({2: 0, 4: 0, 6: 0})
    backend, decision = tiers.pick(routed)
    assert backend.depth == 6 and (decision.depth, decision.source, decision.predicted_agreement) == (6, "load", 1.0)
    tiers.waiting[6] = 3                                          # the deep tier queues
    assert tiers.pick(routed)[0].depth == 4 and tiers.pick(routed)[1].source == "router"
    tiers.waiting.update({4: 5, 6: 2})                            # both queue: the least queued
    assert tiers.pick(routed)[0].depth == 6
    tiers.waiting.update({4: 2, 6: 2})                            # a tie: the shallower
    assert tiers.pick(routed)[0].depth == 4
    tiers.waiting.update({2: 0, 4: 9, 6: 9})                      # never below the floor
    assert tiers.pick(routed)[0].depth == 4
    explicit = DepthDecision(2, 6, "request", None)
    tiers.waiting.update({2: 9, 4: 0, 6: 0})
    assert tiers.pick(explicit)[0].depth == 2                     # an explicit depth is never changed
    assert TierSelector(backends, load_aware=False).pick(routed)[0].depth == 4


def test_waiting_requests_sums_vllm_gauge_samples():
    text = ('# HELP vllm:num_requests_waiting x\n# TYPE vllm:num_requests_waiting gauge\n'
            'vllm:num_requests_waiting{engine="0",model_name="m"} 3.0\n'
            'vllm:num_requests_waiting{engine="1",model_name="m"} 2.0\nvllm:num_requests_running 9\n')
    assert waiting_requests(text) == 5.0 and waiting_requests("") == 0.0


def fake_tier(name: str, queue: dict) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model"}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(f'vllm:num_requests_waiting{{model_name="{name}"}} {queue[name]}\n')

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        return {"id": "c", "object": "text_completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

    return app


@pytest.fixture(scope="module")
def curve_model(tmp_path_factory, cache_dir) -> GatewayModel:
    folder = build_tiny_checkpoint(str(tmp_path_factory.mktemp("curve-model")), "llama", seed=11)
    DepthPlan(6, ORDER, source="test").save(folder)
    with open(f"{folder}/{DEPTH_CURVE_FILE}", "w") as f:
        json.dump({"source": "test", "depth_agreement": {str(d): a for d, a in CURVE.items()}}, f)
    return GatewayModel.load(engine_config(folder, cache_dir, served_model_name="tiny-gw"))


def test_quality_picks_its_tier_and_load_moves_requests_between_tiers(curve_model):
    assert curve_model.depth_curve is not None and curve_model.depth_curve.curve == CURVE
    queue = {"tier-4": 0, "tier-6": 0}
    with contextlib.ExitStack() as stack:
        urls = {d: stack.enter_context(serve_app(fake_tier(f"tier-{d}", queue))) for d in (4, 6)}
        backend_map = json.dumps({str(d): u for d, u in urls.items()})
        backends = BackendMap.parse(backend_map, 6)
        plain = Gateway(curve_model, backends, ServerConfig(backend_map=backend_map).for_router(True))
        loaded = Gateway(curve_model, backends, ServerConfig(backend_map=backend_map).for_router(True), load_aware=True)
        base = stack.enter_context(serve_app(build_gateway_app(plain)))
        load_base = stack.enter_context(serve_app(build_gateway_app(loaded)))

        def tier_of(url, **fields):
            report = httpx.post(url + "/v1/completions", json={"prompt": "x", **fields}, timeout=30).json()["adadepth"]
            return report["depth"], report["source"]

        # Without the load policy: quality 0.7 needs depth 4 (curve), as the engine's router would pick a
        # depth for it; the default quality (0.9) needs 6.
        assert tier_of(base, quality=0.7) == (4, "router") and tier_of(base) == (6, "router")

        def wait_until(predicate, timeout=10.0):
            deadline = time.monotonic() + timeout
            while not predicate():
                assert time.monotonic() < deadline, "the gateway did not read the tiers' queues"
                time.sleep(0.05)

        # Load policy, deep tier idle: quality-0.7 requests go deeper than their floor.
        wait_until(lambda: loaded.tiers.waiting == {4: 0, 6: 0})
        assert tier_of(load_base, quality=0.7) == (6, "load")
        # The deep tier queues: they go to their floor's tier; once it drains, back to the deep one.
        queue["tier-6"] = 4
        wait_until(lambda: loaded.tiers.waiting[6] == 4)
        assert [tier_of(load_base, quality=0.7) for _ in range(3)] == [(4, "router")] * 3
        assert tier_of(load_base, depth=6) == (6, "request")  # named depths are kept
        queue["tier-6"] = 0
        wait_until(lambda: loaded.tiers.waiting[6] == 0)
        assert tier_of(load_base, quality=0.7) == (6, "load")


def test_shipped_model_has_a_depth_curve():
    """The default artifact ships the curve the gateway answers `quality` with."""
    from adadepth.model.loader import DEFAULT_ARTIFACT_DIR

    policy = DepthCurvePolicy.find(DEFAULT_ARTIFACT_DIR, 30)
    assert policy is not None and min(policy.curve) == 18 and policy.curve[30] == 1.0
    values = [policy.curve[d] for d in sorted(policy.curve)]
    assert values == sorted(values)
