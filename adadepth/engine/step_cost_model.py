"""What an engine step costs, learned from the steps the engine runs.

    seconds ~ a + b * decode_layers + c * prefill_layers

decode_layers: the layers run summed over the step's decode rows (16 rows at 30 layers: 480);
prefill_layers: the same over its prompt tokens (a 100-token prompt at 21 layers: 2100). `a` is
what a step costs whatever it holds (the logits, the sampler, Python). Fitted by least squares
over the last `window` steps, every `refit_every` steps; the machine is shared and its speed
drifts, so old steps drop out. A ridge term holds each coefficient near its previous value where
the recent steps say nothing about it (no prefill lately: `c` keeps its last estimate).
"""
from __future__ import annotations

from collections import deque

import numpy as np

# Units that keep the three columns of similar size: thousands of layer-rows.
_SCALE = 1000.0


class StepCostModel:
    def __init__(self, prior: tuple[float, float, float] = (0.005, 0.05, 0.03), window: int = 256,
                 refit_every: int = 8, ridge: float = 1.0):
        """prior: (a seconds, b seconds per 1000 decode row-layers, c seconds per 1000 prompt
        token-layers); the default is of the order of the default model on a 2-core CPU, and
        the fit replaces it within a few dozen steps."""
        self.coef = np.array(prior, dtype=np.float64)
        self.window: deque[tuple[float, float, float]] = deque(maxlen=window)
        self.refit_every = refit_every
        self.ridge = ridge
        self._since_fit = 0

    def observe(self, decode_layers: int, prefill_layers: int, seconds: float) -> None:
        self.window.append((decode_layers / _SCALE, prefill_layers / _SCALE, seconds))
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self.fit()

    def fit(self) -> None:
        self._since_fit = 0
        if len(self.window) < 4:
            return
        data = np.array(self.window)                                           # (n, 3)
        x = np.column_stack([np.ones(len(data)), data[:, 0], data[:, 1]])       # (n, 3)
        y = data[:, 2]
        # Ridge towards the current estimate, weighted against the data's own scale.
        lam = self.ridge * np.sqrt(len(data))
        x_aug = np.vstack([x, lam * np.eye(3) * np.array([1.0, 0.1, 0.1])])
        y_aug = np.concatenate([y, lam * self.coef * np.array([1.0, 0.1, 0.1])])
        coef, *_ = np.linalg.lstsq(x_aug, y_aug, rcond=None)
        self.coef = np.maximum(coef, 0.0)  # a cost is never negative

    def prefill_seconds(self, prefill_layers: float) -> float:
        """What prompt work adds to a step (no fixed part)."""
        return float(self.coef[2] * prefill_layers / _SCALE)

    def predict(self, decode_layers: float, prefill_layers: float) -> float:
        a, b, c = self.coef
        return float(a + b * decode_layers / _SCALE + c * prefill_layers / _SCALE)
