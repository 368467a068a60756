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
