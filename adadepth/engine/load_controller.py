"""`--depth-policy load`: how many layers the next routed requests may get, so that the server
keeps its latency objectives (time to first token, time between tokens).

Each request still has its floor, the depth its quality needs (the router's choice under
`--depth-policy min`); the controller sets an *allowance*, and a routed request runs
max(floor, allowance) (rounded up to a router grid depth, whose predicted agreement is known).
The allowance is full depth while the objectives hold and goes down as load rises:

- **Time between tokens.** `StepCostModel` (fitted on this engine's own steps) predicts a decode
  step holding requests like the current ones under the allowance D: the waiting and the raised
  ones at D, the ones at their floor f at max(f, D) (what they would get under D), explicit depths
  at their own. Prompts arriving take their share of the engine's time
  (prompt tokens per second, measured over the last seconds, times a token's cost at D): a
  stream's average time per token is the decode step over the share left, decode / (1 - f).
  Judging D by the load it would settle to, not by the requests still running from an earlier
  allowance, is what keeps the controller from swinging: it does not drop to the floor because
  deeper requests admitted a moment ago are still draining.
- **Time to first token.** The oldest waiting request has waited w; the queue's prompts need
  prefilling at depth D (in chunks riding decode steps, or whole): w + that time.

The model misses what it does not see (the server around the engine, the client, a noisy
machine), so its time-per-token predictions are scaled by the ratio of the measured time per token
(from one decode step's end to the next, last 3 s) to what it predicted for the current allowance
(smoothed, within 0.5-3). And the measurement has the last word: while it is over 80 % of the
objective, the allowance is scaled down by the overshoot (a step's time is roughly proportional to
its layers; at least one grid step) every 3 s, whatever the model says.

The allowance is the deepest grid depth predicted to meet both objectives within 80 % (they hold
per request, and requests that overlap busier moments run slower than the mean). Stability: it
drops at once when the current allowance is predicted to miss (to the deepest depth that fits),
but rises one grid step at a time, no sooner than 10 s after a drop and only after the next depth
up has been predicted, and the measured time per token seen, to fit within 65 % for
`raise_after_s`: between the two it stays put. A depth is held for a request's life, so decisions
change only what the next requests get.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from adadepth.config import DepthPolicyConfig
from adadepth.engine.step_cost_model import StepCostModel

# Predicted (and measured mean) time per token must stay under 80 % of the objective: the
# objective holds per request, and requests that overlap busier moments run slower than the mean.
_MARGIN = 0.8
_RAISE_MARGIN = 0.65  # ... and under 65 % for the allowance to go up
_ARRIVAL_WINDOW_S = 10.0  # prompt tokens per second are measured over this window
_STEP_WINDOW_S = 3.0     # the measured mean decode step: over this window
_FEEDBACK_EVERY_S = 3.0  # while measured time per token is over the objective: one step down per this
_COOLDOWN_S = 10.0        # no raise for this long after a drop
_CORRECTION_BOUNDS = (0.5, 3.0)
_CORRECTION_SMOOTHING = 0.2
_MAX_PREFILL_SHARE = 0.95  # beyond this share of time spent prefilling, nothing fits


@dataclass
class LoadState:
    """What the engine holds right now, as the controller needs it."""
    fixed_layers: int            # sum of depths of the sequences whose depth no allowance changes
    floor_depths: list[int]      # depths of the routed sequences at their quality's floor
    num_raised: int              # routed sequences this policy raised above their floor
    num_waiting: int             # sequences whose depth is still open (queued or in their router pass)
    waiting_prompt_tokens: int   # their prompt tokens still to prefill
    oldest_wait_s: float         # how long the oldest of them has waited


class LoadController:
    def __init__(self, config: DepthPolicyConfig, depths: list[int], num_layers: int, chunk_tokens: int,
                 raise_after_s: float = 5.0, cost: StepCostModel | None = None):
        """depths: the router's grid (ascending; the last is full depth)."""
        self.slo_ttft = config.slo_ttft_ms / 1000
        self.slo_itl = config.slo_itl_ms / 1000
        self.depths = sorted(depths)
        self.num_layers = num_layers
        self.chunk_tokens = chunk_tokens
        self.raise_after_s = raise_after_s
        self.cost = cost or StepCostModel()
        self.allowance = self.depths[-1]
        self._fits_above_since: float | None = None
        self._last_update: float | None = None
        self._arrivals: deque[tuple[float, int]] = deque()   # (time, prompt tokens) in the window
        self.prompt_token_rate = 0.0                          # prompt tokens per second, last window
        self._steps: deque[tuple[float, float]] = deque()     # (time, seconds) of recent decode steps
        self.correction = 1.0          # measured / predicted time per token, smoothed
        self._last_feedback = -math.inf
        self._last_drop = -math.inf
        # (time, allowance) at every change, for reports; bounded.
        self.history: deque[tuple[float, int]] = deque(maxlen=4096)

    def observe_step(self, decode_layers: int, prefill_layers: int, seconds: float,
                     now: float | None = None) -> None:
        self.cost.observe(decode_layers, prefill_layers, seconds)
        if decode_layers:  # a step that gave streams a token
            self._steps.append((time.monotonic() if now is None else now, seconds))

    def measured_itl(self, now: float) -> float | None:
        """What streams saw over the last few seconds: the mean time from one decode step's end to
        the next (the steps themselves, prefills in between, and the server around the engine;
        gaps over a second are idle time, not counted). None: too few steps."""
        while self._steps and self._steps[0][0] < now - _STEP_WINDOW_S:
            self._steps.popleft()
        gaps = [b - a for (a, _), (b, _) in zip(self._steps, list(self._steps)[1:]) if b - a < 1.0]
        if len(gaps) < 3:
            return None
        return sum(gaps) / len(gaps)

    def observe_arrival(self, num_prompt_tokens: int, now: float) -> None:
        self._arrivals.append((now, num_prompt_tokens))

    def _update_rate(self, now: float) -> None:
        while self._arrivals and self._arrivals[0][0] < now - _ARRIVAL_WINDOW_S:
            self._arrivals.popleft()
        self.prompt_token_rate = sum(n for _, n in self._arrivals) / _ARRIVAL_WINDOW_S

    def decode_step(self, depth: int, state: LoadState) -> float:
        """A decode step's predicted seconds once the requests like these ran under allowance
        `depth`: routed ones at max(floor, depth) (raised ones, whose floor is below their
        depth, at `depth`), the rest at their own."""
        layers = (state.fixed_layers + sum(max(f, depth) for f in state.floor_depths)
                  + (state.num_raised + state.num_waiting) * depth)
        return self.cost.predict(layers, 0)

    def predicted_itl(self, depth: int, state: LoadState) -> float:
        """A stream's average time per token: decode steps, stretched by the engine's time spent
        prefilling the prompts that keep arriving."""
        share = self.cost.prefill_seconds(self.prompt_token_rate * depth)
        if share >= _MAX_PREFILL_SHARE:
            return math.inf
        return self.correction * self.decode_step(depth, state) / (1.0 - share)

    def predicted_ttft(self, depth: int, state: LoadState) -> float:
        if not state.num_waiting:
            return 0.0
        step = self.decode_step(depth, state)
        if self.chunk_tokens:  # the queue's prompts ride decode steps, a chunk at a time
            steps = math.ceil(state.waiting_prompt_tokens / self.chunk_tokens)
            drain = steps * (step + self.cost.prefill_seconds(self.chunk_tokens * depth))
        else:  # whole prefills, then one decode step to the first token
            drain = self.cost.prefill_seconds(state.waiting_prompt_tokens * depth) + step
        return state.oldest_wait_s + drain

    def fits(self, depth: int, state: LoadState, margin: float) -> bool:
        return (self.predicted_itl(depth, state) <= margin * self.slo_itl
                and self.predicted_ttft(depth, state) <= margin * self.slo_ttft)

    def update(self, state: LoadState, now: float) -> int:
        """Recompute the allowance from the engine's state; returns it."""
        # The engine steps every few dozen ms while it has work; a longer gap means it was idle,
        # which counts as the wait before going up (else a lull would leave it low).
        idle = self._last_update is not None and now - self._last_update >= self.raise_after_s
        self._last_update = now
        self._update_rate(now)
        measured = self.measured_itl(now)
        if measured is not None:
            predicted = self.predicted_itl(self.allowance, state) / self.correction
            if 0 < predicted < math.inf:
                low, high = _CORRECTION_BOUNDS
                ratio = min(high, max(low, measured / predicted))
                self.correction += _CORRECTION_SMOOTHING * (ratio - self.correction)
        over = measured is not None and measured > _MARGIN * self.slo_itl
        if over and now - self._last_feedback >= _FEEDBACK_EVERY_S and self.allowance > self.depths[0]:
            # A step's time is roughly proportional to its layers: scale the depth down by the
            # overshoot (at least one grid step).
            self._last_feedback = now
            target = self.allowance * _MARGIN * self.slo_itl / measured
            below = [d for d in self.depths if d < self.allowance]
            fitting = [d for d in below if d <= target]
            self._set(max(fitting) if fitting else below[0], now)
            return self.allowance
        best = next((d for d in reversed(self.depths) if self.fits(d, state, _MARGIN)), self.depths[0])
        if best < self.allowance:
            if not self.fits(self.allowance, state, 1.0):  # a dead band: no drop while within the objectives
                self._set(best, now)
        elif best > self.allowance and idle and not over:
            relaxed = next((d for d in reversed(self.depths) if self.fits(d, state, _RAISE_MARGIN)), self.depths[0])
            if relaxed > self.allowance:
                self._set(relaxed, now)
        elif best > self.allowance:
            up = self.depths[self.depths.index(self.allowance) + 1]
            # After a drop, its effect takes a while to show (requests keep their depth): wait.
            calm = (measured is None or measured <= _RAISE_MARGIN * self.slo_itl) and \
                now - self._last_drop >= _COOLDOWN_S
            if calm and self.fits(up, state, _RAISE_MARGIN):
                if self._fits_above_since is None:
                    self._fits_above_since = now
                elif now - self._fits_above_since >= self.raise_after_s:
                    self._set(up, now)
            else:
                self._fits_above_since = None
        else:
            self._fits_above_since = None
        return self.allowance

    def _set(self, depth: int, now: float) -> None:
        if depth < self.allowance:
            self._last_drop = now
        self.allowance = depth
        self._fits_above_since = None
        self.history.append((now, depth))
