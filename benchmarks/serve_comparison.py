"""Summarise `serve_comparison.sh`: adadepth against vLLM-CPU, like for like, from one run.

Reads the raw `adadepth bench serve` reports of the run (one per system, dtype and depth), keeps
vLLM's best dtype for each depth and concurrency (by median throughput), and writes one JSON with
the machine (CPU model, ISA flags, measured read bandwidth), versions, command lines and
environment, every figure with its median/min/max over repeats, and the ratios the targets name:

  full depth          adadepth (depth 30)  / vLLM on the full export
  depth d             adadepth (depth d)   / vLLM on `adadepth export --depth d`
  depth d vs full     adadepth (depth d)   / vLLM on the full export
  batch-1 bound       adadepth c=1 tok/s   / (read bandwidth / bytes of weights read per token),
                      per repeat with the bandwidth measured just before it, median over repeats

plus a PNG (throughput against concurrency, one panel per depth).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path


def measure_read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of-N GB/s of summing a buffer far larger than the caches (what a decode step does to
    its weights), with torch's threads (all cores)."""
    import torch

    buf = torch.ones(int(gib * 2**30) // 4)
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def weight_bytes_per_token(model_dir: str, bytes_per_param: int) -> int:
    """Bytes a decode step reads per token at batch 1: every layer weight and the LM head (the
    embedding contributes one row, nothing)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if "embed_tokens" in name:
                    continue
                total += _numel(f.get_slice(name).get_shape())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("tie_word_embeddings", False):
        total += config["vocab_size"] * config["hidden_size"]                   # the LM head reads the embedding
    return total * bytes_per_param


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _median(level: dict) -> float:
    rep = level.get("repeats", {}).get("output_throughput_tok_s")
    return rep["median"] if rep else level["output_throughput_tok_s"]


def _summary(level: dict) -> dict:
    rep = level.get("repeats", {})
    figures = {}
    for name, key in (("output_throughput_tok_s", None), ("ttft_p50_ms", ("ttft_ms", "p50")),
                      ("ttft_p99_ms", ("ttft_ms", "p99")), ("itl_p50_ms", ("itl_ms", "p50")),
                      ("itl_p99_ms", ("itl_ms", "p99"))):
        if name in rep:
            figures[name] = {k: rep[name][k] for k in ("median", "min", "max")}
        else:
            value = level[name] if key is None else level[key[0]][key[1]]
            figures[name] = {"median": value, "min": value, "max": value}
    figures["completed"] = level["completed"]
    figures["failed"] = level["failed"]
    return figures


def merge_repeats(raw_dir: Path) -> dict[str, dict]:
    """{label: report} from the raw `<label>_r<k>.json` reports, each level's runs merged
    (median, min and max over the repeats, as `bench serve --repeats` reports them)."""
    from adadepth.benchmarks.serve_bench import _repeated_level

    by_label: dict[str, list[dict]] = {}
    for path in sorted(raw_dir.glob("*_r*.json")):
        by_label.setdefault(re.sub(r"_r\d+$", "", path.stem), []).append(json.loads(path.read_text()))
    merged = {}
    for label, reports in by_label.items():
        levels = []
        for c in [lv["concurrency"] for lv in reports[0]["results"]]:
            runs = [lv for r in reports for lv in r["results"] if lv["concurrency"] == c]
            levels.append(_repeated_level(runs))
        merged[label] = {**reports[0], "results": levels, "started_at": [r["started_at"] for r in reports]}
    return merged


def best_run(reports: dict[str, dict], depth: int, concurrency: int) -> tuple[str, dict] | None:
    """vLLM's fastest run (by median throughput) at `concurrency` among its servers of `depth`
    layers, one per dtype: (label, level), or None if none ran that level."""
    found = [(name, lv) for name, r in reports.items() if name.startswith("vllm_") and name.endswith(f"_d{depth}")
             for lv in r["results"] if lv["concurrency"] == concurrency]
    return max(found, key=lambda item: _median(item[1])) if found else None


def vllm_client_results(runs_dir: Path) -> dict:
    """`vllm bench serve`'s own figures, one per server it was pointed at."""
    keys = ("completed", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "p99_itl_ms",
            "median_tpot_ms", "max_concurrency", "num_prompts")
    out = {}
    for path in sorted(runs_dir.glob("vllm_client_*.json")):
        data = json.loads(path.read_text())
        out[path.stem.removeprefix("vllm_client_")] = {k: data.get(k) for k in keys}
    return out


def repeat_bandwidths(runs_dir: Path) -> dict[int, float]:
    """{repeat: GB/s} measured just before that repeat's full-depth adadepth run (the script's
    `read_bandwidth_r<k>.txt`). This machine's bandwidth moves by 2x within an hour, so the
    bound a batch-1 figure is held to is measured next to it, not once per run."""
    found = {}
    for path in runs_dir.glob("read_bandwidth_r*.txt"):
        text = path.read_text().strip()
        if text:
            found[int(path.stem.removeprefix("read_bandwidth_r"))] = float(text)
    return dict(sorted(found.items()))


def batch1_fractions(runs_dir: Path, full_depth: int, weight_bytes: float) -> list[dict]:
    """Per repeat: adadepth's full-depth c=1 tok/s over the weight-read bound of the bandwidth
    measured just before it; empty without per-repeat bandwidths."""
    out = []
    for repeat, gb_s in repeat_bandwidths(runs_dir).items():
        path = runs_dir / "raw" / f"adadepth_d{full_depth}_r{repeat}.json"
        if not path.exists():
            continue
        level = next((lv for lv in json.loads(path.read_text())["results"] if lv["concurrency"] == 1), None)
        if level is None:
            continue
        bound = gb_s * 1e9 / weight_bytes
        out.append({"repeat": repeat, "read_bandwidth_gb_s": gb_s, "bound_tok_s": bound,
                    "tok_s": level["output_throughput_tok_s"], "fraction": level["output_throughput_tok_s"] / bound})
    return out


def summarise(runs_dir: Path, depths: list[int], meta: dict) -> dict:
    reports = merge_repeats(runs_dir / "raw")
    table = []
    for depth in depths:
        ada = reports.get(f"adadepth_d{depth}")
        if ada is None or not any(name.startswith("vllm_") and name.endswith(f"_d{depth}") for name in reports):
            continue
        for level in ada["results"]:
            c = level["concurrency"]
            peer, peer_full = best_run(reports, depth, c), best_run(reports, max(depths), c)
            row = {"depth": depth, "concurrency": c, "adadepth": _summary(level), "adadepth_run": f"adadepth_d{depth}"}
            if peer is not None:
                row["vllm_best"] = {"run": peer[0], **_summary(peer[1])}
                row["ratio_vs_vllm_same_layers"] = _median(level) / _median(peer[1])
            if peer_full is not None and depth != max(depths):
                row["ratio_vs_vllm_full_depth"] = _median(level) / _median(peer_full[1])
            table.append(row)
    bound = None
    if meta.get("read_bandwidth_gb_s") and meta.get("weight_bytes_per_token"):
        bound = meta["read_bandwidth_gb_s"] * 1e9 / meta["weight_bytes_per_token"]
        per_repeat = batch1_fractions(runs_dir, max(depths), meta["weight_bytes_per_token"])
        for row in table:
            if row["depth"] == max(depths) and row["concurrency"] == 1:
                if per_repeat:
                    row["fraction_of_batch1_weight_read_bound"] = statistics.median(f["fraction"] for f in per_repeat)
                    row["batch1_bound_per_repeat"] = per_repeat
                else:
                    row["fraction_of_batch1_weight_read_bound"] = row["adadepth"]["output_throughput_tok_s"]["median"] / bound
    cross_check = vllm_client_results(runs_dir)
    for label, figures in cross_check.items():
        ours = reports.get(label)
        level = next((lv for lv in ours["results"] if lv["concurrency"] == figures.get("max_concurrency")), None) if ours else None
        if level is not None and figures.get("output_throughput"):
            figures["our_client_output_throughput_tok_s"] = _median(level)
            figures["ratio_vllm_client_to_ours"] = figures["output_throughput"] / _median(level)
    return {"benchmark": "serve_comparison", **meta, "batch1_weight_read_bound_tok_s": bound,
            "comparison": table, "vllm_client_cross_check": cross_check, "runs": reports}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({row["depth"] for row in report["comparison"]}, reverse=True)
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.6), squeeze=False)
    for ax, depth in zip(axes[0], depths):
        rows = [r for r in report["comparison"] if r["depth"] == depth]
        conc = [r["concurrency"] for r in rows]
        for key, label in (("adadepth", "adadepth"), ("vllm_best", "vLLM-CPU (best dtype)")):
            med = [r[key]["output_throughput_tok_s"]["median"] for r in rows]
            lo = [m - r[key]["output_throughput_tok_s"]["min"] for m, r in zip(med, rows)]
            hi = [r[key]["output_throughput_tok_s"]["max"] - m for m, r in zip(med, rows)]
            ax.errorbar(conc, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{depth} layers" + (" (vLLM: static export)" if depth != depths[0] else ""))
        ax.set_xlabel("concurrency")
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    isa = ", ".join(report["machine"].get("isa", [])) or "ISA unknown"
    fig.suptitle(f"{report['machine']['cpu']} ({report['machine']['cpu_count']} cores; {isa}): median of repeats, "
                 "bars min..max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def format_table(report: dict) -> str:
    lines = [f"{'depth':>5} {'conc':>4} {'adadepth tok/s':>15} {'vLLM best tok/s':>16} {'ratio':>6} "
             f"{'vs vLLM full':>12} {'ITL p50/p99 ms':>15}"]
    for r in report["comparison"]:
        a, v = r["adadepth"], r.get("vllm_best")
        itl = f"{a['itl_p50_ms']['median']:.0f}/{a['itl_p99_ms']['median']:.0f}"
        lines.append(f"{r['depth']:>5} {r['concurrency']:>4} {a['output_throughput_tok_s']['median']:>15.1f} "
                     f"{(v['output_throughput_tok_s']['median'] if v else float('nan')):>16.1f} "
                     f"{r.get('ratio_vs_vllm_same_layers', float('nan')):>6.2f} "
                     f"{r.get('ratio_vs_vllm_full_depth', float('nan')):>12.2f} {itl:>15}")
    for label, figures in report.get("vllm_client_cross_check", {}).items():
        lines.append(f"vllm bench serve vs ours, {label} at concurrency {figures.get('max_concurrency')}: "
                     f"{figures.get('output_throughput') or float('nan'):.1f} vs "
                     f"{figures.get('our_client_output_throughput_tok_s') or float('nan'):.1f} tok/s")
    if report.get("batch1_weight_read_bound_tok_s"):
        lines.append(f"batch-1 weight-read bound: {report['batch1_weight_read_bound_tok_s']:.1f} tok/s "
                     f"({report['read_bandwidth_gb_s']:.1f} GB/s / {report['weight_bytes_per_token'] / 1e6:.0f} MB)")
    for r in report["comparison"]:
        for f in r.get("batch1_bound_per_repeat", []):
            lines.append(f"  repeat {f['repeat']}: {f['tok_s']:.1f} tok/s of {f['bound_tok_s']:.1f} "
                         f"({f['read_bandwidth_gb_s']:.1f} GB/s just before) = {f['fraction']:.0%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="folder of the run's raw bench-serve reports")
    parser.add_argument("--depths", default="30,24,21")
    parser.add_argument("--meta", help="JSON with the run's machine, versions, commands and environment")
    parser.add_argument("--model-dir", help="the full export, to count the weight bytes a token reads")
    parser.add_argument("--bytes-per-param", type=int, default=2, help="of adadepth's dtype (2: bfloat16)")
    parser.add_argument("--read-bandwidth-gb-s", type=float, help="the run's measured read bandwidth (default: measure now)")
    parser.add_argument("--out", default="benchmarks/results/serve_comparison.json")
    args = parser.parse_args(argv)
    meta = json.loads(Path(args.meta).read_text()) if args.meta else {}
    from adadepth.benchmarks.serve_bench import machine_info

    meta.setdefault("machine", machine_info())
    measured = list(repeat_bandwidths(Path(args.runs)).values())
    meta["read_bandwidth_gb_s"] = (args.read_bandwidth_gb_s or (statistics.median(measured) if measured else None)
                                   or measure_read_bandwidth())
    if args.model_dir:
        meta["weight_bytes_per_token"] = weight_bytes_per_token(args.model_dir, args.bytes_per_param)
    report = summarise(Path(args.runs), [int(d) for d in args.depths.split(",")], meta)
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out.with_suffix(".png"))
    print(format_table(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
