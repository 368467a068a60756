"""Where a training step's time goes: wall time per phase (PhaseTimer) and the top ops of
torch.profiler (OpProfile), both over a few profiled steps only, since they slow the steps they watch."""
from __future__ import annotations

import time

import torch


class PhaseTimer:
    """Wall time per phase of a training step, the device synchronised at each mark. Only the
    few profiled steps pay for the syncs; otherwise marks cost nothing."""

    def __init__(self, device: torch.device):
        self.device = device
        self.active = False
        self.ms: dict[str, float] = {}
        self._last = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        if self.active:
            self._sync()
            self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        if self.active:
            self._sync()
            now = time.perf_counter()
            self.ms[phase] = round(self.ms.get(phase, 0.0) + 1000 * (now - self._last), 2)
            self._last = now


class OpProfile:
    """torch.profiler over the profiled steps only (it slows every op it records): one table of
    the ops that took the most device and host time, written to `path` when they end."""

    def __init__(self, path: str | None, device: torch.device):
        self.path, self.device = path, device
        self.profiler = None

    def step(self, active: bool) -> None:
        if not self.path:
            return
        if active and self.profiler is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=acts)
            self.profiler.start()
        elif not active and self.profiler is not None:
            self.profiler.stop()
            table = self.profiler.key_averages()
            with open(self.path, "w") as f:
                for key in (["self_cuda_time_total"] if self.device.type == "cuda" else []) + ["self_cpu_time_total"]:
                    f.write(f"# sorted by {key}\n{table.table(sort_by=key, row_limit=40)}\n")
            self.profiler = None
            self.path = None  # once per run
