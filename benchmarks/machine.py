"""Describe the machine a benchmark ran on, so every saved figure says where it came from."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def git_commit() -> str | None:
    """The checkout's commit, where it is a git checkout."""
    import subprocess

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


def machine_info() -> dict:
    import datetime

    import torch

    from adadepth.hardware import cpu_model, isa_summary

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": cpu_model(),
            "isa": isa_summary(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def median_ms(fn, repeats: int, warmup: int = 0) -> float:
    """Median milliseconds of `repeats` timed calls of fn(), after `warmup` untimed ones."""
    import statistics
    import time

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def finish_plot(fig, ax, title: str, machine: dict, png) -> None:
    """The common end of a benchmark's plot: `title` followed by the machine (CPU model and its last
    two ISA flags), the legend, and the PNG written."""
    import matplotlib.pyplot as plt

    ax.set_title(f"{title}, {machine.get('cpu', '')} {' '.join(machine.get('isa', [])[-2:])}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def save_report(report: dict, out: str, plot=None) -> Path:
    """Write a benchmark's JSON to `out` (a relative path is taken from the repository root) and,
    given `plot(report, png_path)`, its plot beside it; returns the JSON's path."""
    path = Path(out)
    path = path if path.is_absolute() else Path(__file__).resolve().parents[1] / path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    if plot is not None:
        plot(report, path.with_suffix(".png"))
    return path
