"""benchmarks/gpu_check.py runs on a device machine from a bare checkout: its logic on the CPU
(--dry-run-cpu) and its import shim, without the installed package."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def test_dry_run_on_cpu_passes_and_finds_the_model_step(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--dry-run-cpu", "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["all_correct"] and report["checks"]
    assert report["model_step"] == {"status": "skipped", "note": "present; not run with --dry-run-cpu"}


def test_shim_imports_adadepth_from_a_bare_checkout(tmp_path):
    """With the installed package hidden, ensure_adadepth lays the checkout out as pyproject's
    package-dir does, in a shim folder; the repo root stays off sys.path (its kernels/ would
    shadow the PyPI package transformers probes for)."""
    code = f"""
import importlib.util, sys
sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path = [p for p in sys.path if p not in ("", {str(REPO)!r})]
try:
    import adadepth
    raise SystemExit("adadepth still importable: the test hides nothing")
except ImportError:
    pass
spec = importlib.util.spec_from_file_location("gpu_check", {str(SCRIPT)!r})
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check
spec.loader.exec_module(gpu_check)
where = gpu_check.ensure_adadepth({str(tmp_path)!r})
import adadepth.benchmarks.gpu_model_step as step, adadepth.kernels.batched_skip as bs, adadepth.router.depth_grid
print(where, step.__file__, bs.__file__, {str(REPO)!r} in sys.path)
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    where, step_file, bs_file, repo_on_path = run.stdout.split()
    assert where == str(tmp_path / "adadepth")
    assert step_file == str(tmp_path / "adadepth" / "benchmarks" / "gpu_model_step.py")
    assert bs_file == str(tmp_path / "adadepth" / "kernels" / "batched_skip.py")
    assert repo_on_path == "False"
