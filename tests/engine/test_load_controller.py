"""`--depth-policy load`: the controller on a simulated server (rising, steady, falling load),
the cost model's fit, and the policy inside the engine (floors and explicit depths kept)."""
from __future__ import annotations

import random

import pytest

from adadepth.config import DepthPolicyConfig
from adadepth.engine.load_controller import LoadController, LoadState
from adadepth.engine.step_cost_model import StepCostModel

GRID = [18, 21, 24, 27, 30]
TRUE_COST = (0.008, 0.045, 0.03)  # a, b, c as StepCostModel holds them (seconds, per 1000 layer-rows)


def step_seconds(decode_layers: int, prefill_layers: int) -> float:
    a, b, c = TRUE_COST
    return a + b * decode_layers / 1000 + c * prefill_layers / 1000


def test_cost_model_recovers_the_step_cost():
    model = StepCostModel(prior=(0.02, 0.01, 0.01))
    rng = random.Random(0)
    for _ in range(300):
        decode = rng.randrange(0, 64) * 30
        prefill = rng.choice([0, 0, 0, rng.randrange(1, 64) * 30])
        model.observe(decode, prefill, step_seconds(decode, prefill) * rng.uniform(0.97, 1.03))
    for decode, prefill in [(30, 0), (480, 0), (1920, 1920), (0, 30000)]:
        assert model.predict(decode, prefill) == pytest.approx(step_seconds(decode, prefill), rel=0.06)


def simulate(rates: list[tuple[float, float]], seed: int = 0, tokens: int = 64, prompt: int = 100):
    """A server driven by the controller. rates: (seconds, arrivals per second) phases. Every
    request asks for a floor drawn from the grid; it runs max(floor, allowance rounded up to the
    grid). Whole prefills, then decode steps of every running request. Returns per-step records
    (time, allowance, step seconds) and the requests' (floor, depth, ttft)."""
    rng = random.Random(seed)
    controller = LoadController(DepthPolicyConfig(depth_policy="load", slo_ttft_ms=2000, slo_itl_ms=100),
                                GRID, 30, chunk_tokens=0, cost=StepCostModel(prior=TRUE_COST))
    arrivals, t = [], 0.0
    for duration, rate in rates:
        end = t + duration
        while True:
            t += rng.expovariate(rate)
            if t >= end:
                t = end
                break
            arrivals.append(t)
    now, queue, running, steps, done = 0.0, [], [], [], []
    floors = iter(rng.choice(GRID[:3]) for _ in range(len(arrivals)))
    i = 0
    while i < len(arrivals) or queue or running:
        while i < len(arrivals) and arrivals[i] <= now:
            queue.append({"arrival": arrivals[i], "floor": next(floors)})
            controller.observe_arrival(prompt, arrivals[i])
            i += 1
        if not queue and not running:
            now = arrivals[i]
            continue
        state = LoadState(0, [r["depth"] for r in running if r["depth"] == r["floor"]],
                          sum(1 for r in running if r["depth"] > r["floor"]), len(queue), prompt * len(queue),
                          now - min((q["arrival"] for q in queue), default=now))
        allowance = controller.update(state, now)
        if queue:  # admit everyone waiting: one whole prefill
            for q in queue:
                q["depth"] = max(q["floor"], next(d for d in GRID if d >= allowance))
                q["left"] = tokens
            seconds = step_seconds(0, prompt * sum(q["depth"] for q in queue))
            controller.observe_step(0, prompt * sum(q["depth"] for q in queue), seconds, now)
            now += seconds
            for q in queue:
                q["ttft"] = now - q["arrival"]
            running += queue
            queue = []
        else:
            seconds = step_seconds(sum(r["depth"] for r in running), 0)
            controller.observe_step(sum(r["depth"] for r in running), 0, seconds, now)
            now += seconds
            for r in running:
                r["left"] -= 1
            done += [r for r in running if r["left"] == 0]
            running = [r for r in running if r["left"] > 0]
        steps.append((now, controller.allowance, seconds))
    return steps, done, controller


def test_low_load_keeps_full_depth():
    steps, done, _ = simulate([(60.0, 2.0)])
    assert sum(1 for r in done if r["depth"] == 30) >= 0.98 * len(done)
    assert all(r["ttft"] <= 2.0 for r in done)


def test_rising_steady_falling_load():
    """1 req/s, then 8 req/s (beyond what full depth sustains: ~6), then 1 req/s again."""
    steps, done, controller = simulate([(30.0, 1.0), (60.0, 8.0), (60.0, 1.0)])
    assert all(r["depth"] >= r["floor"] for r in done)                        # floors never crossed
    during = [a for t, a, _ in steps if 45.0 <= t <= 90.0]
    assert max(during) < 30                                                    # it went down under load
    # Steady overload: the allowance settles instead of swinging (a handful of changes at most).
    steady = [a for t, a, _ in steps if 60.0 <= t <= 90.0]
    changes = sum(1 for x, y in zip(steady, steady[1:]) if x != y)
    assert changes == 0, changes
    # Load gone: back up to full depth, never down again on the way.
    assert [a for t, a, _ in steps if t >= 140.0][-1] == 30
    ups = [a for t, a in controller.history if t > 90.0]
    assert ups == sorted(ups) and ups[-1] == 30
    # The objectives held: time to first token within 2 s for every request.
    assert max(r["ttft"] for r in done) <= 2.0


def test_measured_steps_overrule_an_optimistic_model():
    """The cost model believes steps are 4x cheaper than they are: the measured mean step (over
    the objective) pulls the allowance down anyway, and the correction factor learns the gap."""
    controller = LoadController(DepthPolicyConfig(depth_policy="load", slo_ttft_ms=2000, slo_itl_ms=100),
                                GRID, 30, chunk_tokens=0, cost=StepCostModel(prior=(0.002, 0.01, 0.01), refit_every=10**9))
    state = LoadState(fixed_layers=0, floor_depths=[], num_raised=40, num_waiting=0, waiting_prompt_tokens=0,
                      oldest_wait_s=0.0)
    now = 0.0
    for _ in range(200):  # 24 s of steps taking 120 ms, modelled at ~14 ms
        now += 0.12
        controller.observe_step(1200, 0, 0.12, now)
        controller.update(state, now)
    assert controller.allowance == GRID[0]
    assert controller.correction > 2.0
