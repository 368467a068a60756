"""`adadepth bench matmul-rows`: the paired matmul kernel against oneDNN, per number of rows.

Where `PackedLinear.paired_max_rows` comes from. The products are the default model's: every layer's
qkv, o, gate/up and down matmul (30 layers, ~212 MB of bf16 weights or ~425 MB of float32, so each
matmul meets its weight cold, as in a decode step), with M rows of activations. oneDNN runs as
PackedLinear runs it (its packed weight, `mkldnn::_linear_pointwise`), the paired kernel on its own
copy (bf16: k-pairs, float32: 8-column blocks); float32 on CPUs with F16C also from a float16 copy
(path `paired_f16w`: the weights rounded to float16 values, as `--weight-dtype float16` serves them; all
paths multiply those values). The paths alternate within each repeat; each repeat's
time is the median of a few sweeps; reported: the median over repeats and GFLOPS (2 * M * sum of N*K
per sweep). bf16 needs a CPU with AVX512-BF16, float32 one with AVX2 and FMA.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field

# (out_features, in_features) of one layer of the default model (SmolLM2-135M), qkv and gate/up fused.
DEFAULT_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))


@dataclass
class MatmulRowsBenchConfig:
    rows: str = field(default="8,16,32,48,64,96,128,192,256,384,512,1024",
                      metadata={"help": "comma-separated row counts (M)"})
    num_layers: int = field(default=30, metadata={"help": "layers of weights swept per timing"})
    repeats: int = field(default=5, metadata={"help": "alternating repeats per path and row count"})
    sweeps: int = field(default=4, metadata={"help": "timed sweeps per repeat (median)"})
    dtype: str = field(default="bfloat16", metadata={"help": "bfloat16 or float32"})
    out: str = field(default="benchmarks/results/matmul_rows.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError("dtype must be bfloat16 or float32")
        self.row_list = [int(x) for x in self.rows.split(",") if x.strip()]
        if not self.row_list or min(self.row_list) < 1:
            raise ValueError("rows must be positive")
        if self.num_layers < 1 or self.repeats < 1 or self.sweeps < 1:
            raise ValueError("num_layers, repeats and sweeps must be >= 1")


def run(cfg: MatmulRowsBenchConfig) -> dict:
    import os

    import torch

    from adadepth.benchmarks.machine import machine_info, median_ms, save_report
    from adadepth.config import ModelConfig
    from adadepth.kernels.cpu_ops import load_cpu_ops
    from adadepth.kernels.paired_linear import pack_for_kernel
    from adadepth.model.packed_linear import PackedLinear

    dtype = getattr(torch, cfg.dtype)
    ops = load_cpu_ops(os.path.join(ModelConfig().cache_dir, "extensions"))
    if ops is None or dtype not in ops.paired_dtypes:
        raise SystemExit(f"the paired {cfg.dtype} kernel is not available here (bf16 needs AVX512-BF16, float32 "
                         "AVX2; or no C++ compiler)")
    g = torch.Generator().manual_seed(0)
    shapes = [s for _ in range(cfg.num_layers) for s in DEFAULT_SHAPES]
    half_weights = dtype == torch.float32 and ops.paired_half_weights
    # (N, K) each; float16 values where a float16 copy is timed too, so that every path multiplies the same weights
    plain = [(torch.randn(n, k, generator=g) / k ** 0.5).to(torch.float16 if half_weights else dtype).to(dtype)
             for n, k in shapes]
    paired = [pack_for_kernel(w) for w in plain]                          # bf16 (N/16, K/2, 16, 2), fp32 (N/8, K, 8)
    half = [pack_for_kernel(w, torch.float16) for w in plain] if half_weights else []    # (N/8, K, 8) float16
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, None) for w in plain]
    flops_per_row = 2 * sum(n * k for n, k in shapes)
    rows_out = []
    for m in cfg.row_list:
        xs = {k: torch.randn(m, k, generator=g).to(dtype) for k in {k for _, k in DEFAULT_SHAPES}}   # (M, K)
        err = max((ops.paired_linear(xs[w.shape[1]], p, None).float()
                   - torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], d, None, "none", [], "").float()).abs().max().item()
                  for w, p, d in zip(plain[:4], paired[:4], onednn[:4]))
        runs = {
            "paired": lambda: [ops.paired_linear(xs[k], p, None) for (_, k), p in zip(shapes, paired)],
            "onednn": lambda: [torch.ops.mkldnn._linear_pointwise(xs[k], d, None, "none", [], "")
                               for (_, k), d in zip(shapes, onednn)],
        }
        if half_weights:
            runs["paired_f16w"] = lambda: [ops.paired_linear(xs[k], p, None) for (_, k), p in zip(shapes, half)]
            # The same values summed in the same order: 0 unless the float16 copy is read wrong.
            f16w_err = max((ops.paired_linear(xs[k], h, None) - ops.paired_linear(xs[k], p, None)).abs().max().item()
                           for (_, k), h, p in zip(shapes[:4], half[:4], paired[:4]))
        times = {name: [] for name in runs}
        for r in range(cfg.repeats):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                times[name].append(median_ms(runs[name], cfg.sweeps))
        med = {name: statistics.median(v) for name, v in times.items()}
        gflops = {name: m * flops_per_row / (ms * 1e6) for name, ms in med.items()}
        case = {"rows": m, "ms_per_repeat": times, "ms_median": med, "gflops": gflops,
                "onednn_over_paired": med["onednn"] / med["paired"], "max_abs_diff": err}
        line = (f"M={m:5d}: paired {med['paired']:8.2f} ms ({gflops['paired']:.0f} GFLOPS), oneDNN "
                f"{med['onednn']:8.2f} ms ({gflops['onednn']:.0f}), oneDNN/paired x{med['onednn'] / med['paired']:.2f}")
        if half_weights:
            case["f16w_max_abs_diff_to_paired"] = f16w_err
            case["paired_over_paired_f16w"] = med["paired"] / med["paired_f16w"]
            case["onednn_over_paired_f16w"] = med["onednn"] / med["paired_f16w"]
            line += (f"; float16 copy {med['paired_f16w']:8.2f} ms, paired/float16 copy "
                     f"x{case['paired_over_paired_f16w']:.2f}, oneDNN/float16 copy x{case['onednn_over_paired_f16w']:.2f}")
        rows_out.append(case)
        print(line, flush=True)
    machine = machine_info()
    report = {"benchmark": "matmul_rows", "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench matmul-rows " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items()),
              "machine": machine, "shapes_per_layer": [list(s) for s in DEFAULT_SHAPES],
              "dtype": cfg.dtype, "weight_mb": sum(n * k for n, k in shapes) * plain[0].element_size() / 1e6,
              "float16_copy_timed": half_weights,
              "paired_max_rows_in_use": PackedLinear.paired_max_rows, "cases": rows_out}
    path = save_report(report, cfg.out, plot)
    print(f"wrote {path}")
    return report


def plot(report: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adadepth.benchmarks.machine import finish_plot

    rows = [c["rows"] for c in report["cases"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    tiles = "8 x 3 tiles" if report.get("dtype", "bfloat16") == "bfloat16" else "6 x 2 tiles"
    names = (("paired", f"paired kernel ({tiles})"), ("paired_f16w", "paired kernel, float16 copy"),
             ("onednn", "oneDNN, packed weight"))
    for name, label in ((n, lab) for n, lab in names if n in report["cases"][0]["gflops"]):
        ax.plot(rows, [c["gflops"][name] for c in report["cases"]], marker="o", label=label)
    ax.axvline(report["paired_max_rows_in_use"], color="gray", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (M)")
    ax.set_ylabel("GFLOPS (median of repeats)")
    finish_plot(fig, ax, f"default model's matmuls, {report.get('dtype', 'bfloat16')}", report["machine"], png)


def add_parser(subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(subparsers, "matmul-rows", MatmulRowsBenchConfig, run,
                       help="matmuls: the paired kernel against oneDNN, per number of rows")
