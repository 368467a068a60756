#!/usr/bin/env python3
"""GPU check of the batched-skip kernels (kernels/batched_skip.cu).

    python benchmarks/gpu_check.py --out DIR          # on a CUDA machine
    python benchmarks/gpu_check.py --out DIR --dry-run-cpu   # exercises this script on CPU

1. correctness: kernels against the PyTorch reference on fresh random inputs (decode and
   packed-prefill row counts, three hidden sizes, three dtypes), output buffers poisoned with
   NaN so unwritten rows show, inactive rows of `hidden` checked bit for bit, plus CUDA-graph
   replay and odd layouts (unaligned, strided, very wide rows);
2. speed: the kernels and the plain PyTorch path (index_select + RMSNorm / index_add_) timed
   with CUDA events over CUDA-graph replays, as bandwidth against the card's own
   device-to-device copy bandwidth measured in the same run (target: >= 70 % for large N);
3. the mixed-depth decode step of the default model (adadepth.benchmarks.gpu_model_step.
   run(out_dir)). Without the package installed, adadepth is imported through a shim of
   symlinks (`ensure_adadepth`): without them a device run once skipped this step.

Prints a table, writes DIR/gpu_check.json, exits 1 if a correctness check fails.
With --dry-run-cpu the reference stands in for the kernels on small CPU shapes and timing uses
the wall clock: the figures mean nothing, the script's logic is what gets run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def ensure_adadepth(shim_root: str | None = None) -> str:
    """Make `adadepth.*` importable and return the folder it comes from: the installed package,
    else a shim of symlinks laid out as pyproject's package-dir maps the checkout (adadepth/,
    with server/, router/, kernels/ and benchmarks/ as its subpackages). A device machine runs
    this script from a bare checkout. The checkout's root never goes on sys.path: its top-level
    kernels/ would shadow the PyPI package `kernels` that transformers probes for."""
    try:
        importlib.import_module("adadepth.kernels.batched_skip")
        return str(Path(sys.modules["adadepth"].__file__).parent)
    except ImportError:
        for name in [m for m in sys.modules if m == "adadepth" or m.startswith("adadepth.")]:
            del sys.modules[name]
    root = Path(shim_root or tempfile.mkdtemp(prefix="adadepth-shim-"))
    package = root / "adadepth"
    package.mkdir(parents=True, exist_ok=True)
    links = {entry.name: entry for entry in (REPO / "adadepth").iterdir()}
    links.update({sub: REPO / sub for sub in ("server", "router", "kernels", "benchmarks") if (REPO / sub).is_dir()})
    for name, target in links.items():
        if not (package / name).exists():
            (package / name).symlink_to(target)
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()
    importlib.import_module("adadepth.kernels.batched_skip")
    return str(package)


def load_batched_skip():
    ensure_adadepth()
    from adadepth.kernels import batched_skip

    return batched_skip


# ===========================================================================================
# HOOK: mixed-depth decode step of the default model vs full depth.
# Implemented elsewhere as adadepth.benchmarks.gpu_model_step (benchmarks/gpu_model_step.py)
# with run(out_dir) -> JSON-serialisable dict; this script only finds and calls it.
# ===========================================================================================


def run_model_step_hook(out_dir: Path, dry_run: bool) -> dict:
    try:
        ensure_adadepth()
        module = importlib.import_module("adadepth.benchmarks.gpu_model_step")
    except Exception:
        return {"status": "error", "error": traceback.format_exc(limit=5)}
    if dry_run:
        return {"status": "skipped", "note": "present; not run with --dry-run-cpu"}
    try:
        result = module.run(out_dir)
        json.dumps(result)  # fail here, not when the report is written
        return {"status": "ok", "result": result}
    except Exception:
        return {"status": "error", "error": traceback.format_exc(limit=5)}


# -------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    print(f"\n== {report['card']} | torch {report['torch']} | arch {report.get('arch')} | "
          f"cuda-core {report['cuda-core']} | nvrtc {report['nvidia-cuda-nvrtc']}")
    checks = report.get("checks", [])
    failed = [c for c in checks if not c["passed"]]
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} checks passed")
    worst: dict[str, float] = {}
    for c in checks:
        key = f"{c['name']:<18} {c['dtype']}"
        worst[key] = max(worst.get(key, 0.0), c["max_err_over_tol"])
    for key, ratio in sorted(worst.items()):
        print(f"  {key:<24} worst err/tol {ratio:.3f}")
    for c in failed[:20]:
        print(f"  FAIL {c['name']} {c['dtype']} rows={c['rows']} dim={c['dim']} "
              f"active={c['active']} err/tol={c['max_err_over_tol']:.3g} {c['notes']}")
    perf = report.get("perf")
    if perf:
        print(f"\ncopy bandwidth {perf['copy_bandwidth_GBps']:.0f} GB/s (read+write); "
              f"target {perf['bw_target']:.0%} for rows>=16384, dim>=2048: "
              f"{'met' if perf['bw_target_met'] else 'NOT met'}")
        print(f"{'dtype':<5} {'rows':>6} {'dim':>5} {'active':>6} | "
              + " | ".join(f"{op:<28}" for op in ("gather_rmsnorm", "scatter_add", "scatter_add+norm")))
        print(f"{'':<26} | " + " | ".join(f"{'us  torch_us  %copy  x':<28}" for _ in range(3)))
        for r in perf["cases"]:
            cells = []
            for op in ("gather_rmsnorm", "scatter_add", "scatter_add+norm"):
                o = r[op]
                frac, speedup = o["frac_of_copy_bw"] or 0.0, o["speedup"] or 0.0
                cells.append(f"{o['kernel_us']:7.1f} {o['torch_us']:8.1f} "
                             f"{100 * frac:5.0f}% {speedup:5.1f}")
            print(f"{r['dtype']:<5} {r['rows']:>6} {r['dim']:>5} {r['active']:>6} | " + " | ".join(cells))
        for r in perf["launch_sweep"]:
            grid = {None: "auto grid ", True: "persistent", False: "per-row   "}[r["persistent"]]
            print(f"  vpt {r['vectors_per_thread']} {grid}"
                  f"{'' if r['variant_correct'] else ' (WRONG)'}: "
                  f"{r['dtype']} {r['rows']}x{r['dim']} a={r['active']} "
                  + ", ".join(f"{op} {r[op]['kernel_us']:.1f} us "
                              f"({100 * (r[op]['frac_of_copy_bw'] or 0):.0f}%)"
                              for op in ("gather_rmsnorm", "scatter_add", "scatter_add+norm")))
        print("active_rows us: " + ", ".join(f"N={k}: {v:.1f}" for k, v in perf["active_rows_us"].items()))
        print("eager host us/call: " + ", ".join(
            f"{k}: {v:.1f}" for k, v in perf["eager_host_us_per_call"].items()))
    print(f"\nmodel step hook: {report['model_step'].get('status')} "
          f"{report['model_step'].get('note', '')}")
    for key in ("build_error", "correctness_error", "perf_error"):
        if key in report:
            print(f"\n{key}:\n{report[key]}")
    print(f"\nall correct: {report['all_correct']}  ({report['elapsed_s']:.1f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run the script logic on CPU with the reference as the kernel")
    parser.add_argument("--skip-perf", action="store_true", help="correctness only")
    parser.add_argument("--quick", action="store_true",
                        help="small correctness shapes (e.g. under compute-sanitizer)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    bs = load_batched_skip()   # makes adadepth importable, so the parts below are too
    from adadepth.benchmarks.gpu_check_correctness import Check, ReferenceAsKernels, run_correctness
    from adadepth.benchmarks.gpu_check_perf import run_perf

    dry = args.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run-cpu to exercise the script on CPU")
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    report: dict = {
        "card": "cpu (dry run)" if dry else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": dry,
        "python": sys.version.split()[0],
    }
    for dist in ("cuda-core", "cuda-bindings", "nvidia-cuda-nvrtc"):
        try:
            report[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            report[dist] = None

    K = None
    try:
        t = time.perf_counter()
        K = ReferenceAsKernels(bs) if dry else bs.BatchedSkipKernels(device)
        report["build_s"] = time.perf_counter() - t
        report["arch"] = None if dry else K.arch
    except Exception:
        report["build_error"] = traceback.format_exc()

    checks: list[Check] = []
    if K is not None:
        try:
            checks = run_correctness(K, bs, device, dry, args.quick)
        except Exception:
            report["correctness_error"] = traceback.format_exc()
        report["correctness_s"] = time.perf_counter() - t0
    report["checks"] = [asdict(c) for c in checks]
    report["all_correct"] = (
        K is not None and bool(checks) and "correctness_error" not in report
        and all(c.passed for c in checks)
    )

    if K is not None and not args.skip_perf:
        try:
            report["perf"] = run_perf(K, bs, device, dry)
        except Exception:
            report["perf_error"] = traceback.format_exc()

    report["model_step"] = run_model_step_hook(args.out, dry)
    report["elapsed_s"] = time.perf_counter() - t0
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    return 0 if report["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
