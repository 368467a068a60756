"""`adadepth bench attention`: a prompt's causal attention through SDPA against the paged decode kernel
run row by row, per prompt length and dtype.

Each token of a prompt attends to positions [0, its own]; the paged kernel does that as one decode
row per token (its context length and block table), the other route as one SDPA over the gathered
context (`chunk_attention`). The kernel's cost grows with the (query, key) pairs, SDPA's carries a
fixed cost per call and more efficient matmuls: this finds the prompt length where they cross, which
sets `LayerOps.chunk_pairs_limit`. Default model's heads (9 query, 3 kv, head dim 64); blocks of 16
handed out in shuffled order; the two routes alternate within each repeat on the same inputs.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field


@dataclass
class ChunkAttentionBenchConfig:
    lengths: str = field(default="32,64,128,256,512,1024,2048", metadata={"help": "comma-separated prompt lengths"})
    dtypes: str = field(default="float32,bfloat16", metadata={"help": "comma-separated, of float32, bfloat16"})
    num_heads: int = field(default=9, metadata={"help": "query heads"})
    num_kv_heads: int = field(default=3, metadata={"help": "kv heads"})
    head_dim: int = field(default=64, metadata={"help": "head dim"})
    repeats: int = field(default=7, metadata={"help": "timed calls per route and length (median)"})
    out: str = field(default="benchmarks/results/chunk_attention.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        self.length_list = [int(x) for x in self.lengths.split(",") if x.strip()]
        self.dtype_list = [x.strip() for x in self.dtypes.split(",") if x.strip()]
        if not self.length_list or min(self.length_list) < 1:
            raise ValueError("lengths must be positive")
        if not self.dtype_list or set(self.dtype_list) - {"float32", "bfloat16"}:
            raise ValueError("dtypes must be float32 and/or bfloat16")
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads or self.head_dim < 1 or self.repeats < 1:
            raise ValueError("num_heads must be a multiple of num_kv_heads; head_dim and repeats >= 1")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(cfg: ChunkAttentionBenchConfig) -> dict:
    import os

    import torch

    from adadepth.benchmarks.machine import machine_info, save_report
    from adadepth.config import ModelConfig
    from adadepth.kernels.cpu_ops import load_cpu_ops
    from adadepth.kernels.paged_attention import chunk_attention

    ops = load_cpu_ops(os.path.join(ModelConfig().cache_dir, "extensions"))
    if ops is None or ops.chunk_pairs_limit is None:
        raise SystemExit("the C++ CPU kernels did not build here (see the warning logged)")
    g = torch.Generator().manual_seed(0)
    bs, H, Hkv, Dh = 16, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    scale = Dh ** -0.5
    cases = {}
    for name in cfg.dtype_list:
        dtype = getattr(torch, name)
        rows = []
        for length in cfg.length_list:
            nblk = -(-length // bs)
            k_cache = torch.randn(nblk + 8, bs, Hkv, Dh, generator=g).to(dtype)   # (num_blocks, bs, Hkv, Dh)
            v_cache = torch.randn(nblk + 8, bs, Hkv, Dh, generator=g).to(dtype)
            table = torch.randperm(nblk + 8, generator=g)[:nblk]                   # (nblk,)
            q = torch.randn(length, H, Dh, generator=g).to(dtype)                   # (L, H, Dh)
            lens = torch.arange(1, length + 1)                                       # token i sees [0, i]
            tables = table[None].expand(length, nblk)                               # (L, nblk): one row per token
            sdpa = lambda: chunk_attention(q, k_cache, v_cache, table, 0, scale)     # noqa: E731
            kernel = lambda: ops.paged_attention(q, k_cache, v_cache, tables, lens, scale)   # noqa: E731
            err = (sdpa().float() - kernel().float()).abs().max().item()
            times = {"sdpa": [], "paged_kernel": []}
            for _ in range(cfg.repeats):
                times["sdpa"].append(1000 * _time(sdpa))
                times["paged_kernel"].append(1000 * _time(kernel))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"length": length, "pairs": length * (length + 1) // 2, "ms_median": med,
                         "ms_min": {k: min(v) for k, v in times.items()}, "kernel_over_sdpa": med["paged_kernel"] / med["sdpa"],
                         "max_abs_diff": err})
            print(f"{name:>8} L={length:5d}: SDPA {med['sdpa']:8.3f} ms, paged kernel {med['paged_kernel']:8.3f} ms "
                  f"(x{med['paged_kernel'] / med['sdpa']:.2f}), max |diff| {err:.2e}", flush=True)
        faster = [r["length"] for r in rows if r["kernel_over_sdpa"] <= 1.0]
        cases[name] = {"rows": rows, "chunk_pairs_limit_in_use": ops.chunk_pairs_limit(dtype, Dh, H // Hkv),
                       "longest_prompt_kernel_not_slower": max(faster) if faster else 0}
    machine = machine_info()
    report = {"benchmark": "chunk_attention", "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench attention " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items()),
              "machine": machine, "heads": {"num_heads": H, "num_kv_heads": Hkv, "head_dim": Dh, "block_size": bs},
              "cases": cases}
    path = save_report(report, cfg.out, plot)
    print(f"wrote {path}")
    return report


def plot(report: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adadepth.benchmarks.machine import finish_plot

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, case in report["cases"].items():
        lengths = [r["length"] for r in case["rows"]]
        ax.plot(lengths, [r["kernel_over_sdpa"] for r in case["rows"]], marker="o", label=name)
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("paged kernel time / SDPA time")
    finish_plot(fig, ax, "causal prompt attention", report["machine"], png)


def add_parser(subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(subparsers, "attention", ChunkAttentionBenchConfig, run,
                       help="prompt attention: SDPA against the paged kernel row by row, per length")
