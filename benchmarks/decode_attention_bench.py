"""`adadepth bench decode-attention`: how fast the paged decode attention kernel reads a cold context.

In a decode step each layer's attention meets its KV context cold (the step's weights went through
the cache since that layer's last step), scattered block by block over a large cache. This times the
kernel (bf16 on CPUs with AVX512-BF16, else float32) over `num_layers` separate caches, one call per
layer as in a step, for each (rows, context length) case, and once more over a single layer's cache
(warm: it stays in L2/L3 between calls) for comparison. Default model's heads (9 query, 3 kv, head
dim 64), blocks of 16 handed out in shuffled order. Reported: milliseconds per sweep of the layers
(median of repeats) and the context bytes read per second (K and V once each).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class DecodeAttentionBenchConfig:
    cases: str = field(default="1x300,16x170,64x170,64x400", metadata={
        "help": "comma-separated ROWSxCONTEXT cases (decode rows x context length)"})
    dtype: str = field(default="auto", metadata={"help": "bfloat16, float32, or auto (the engine's pick)"})
    num_layers: int = field(default=30, metadata={"help": "separate caches swept per timing (cold reads)"})
    repeats: int = field(default=12, metadata={"help": "timed sweeps per case (median)"})
    label: str = field(default="", metadata={"help": "names this run in the JSON (e.g. the version measured)"})
    out: str = field(default="benchmarks/results/decode_attention.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        try:
            self.case_list = [tuple(int(v) for v in c.lower().split("x")) for c in self.cases.split(",") if c.strip()]
        except ValueError:
            raise ValueError("cases must look like 16x170,64x400") from None
        if not self.case_list or any(len(c) != 2 or min(c) < 1 for c in self.case_list):
            raise ValueError("cases must look like 16x170,64x400 (positive numbers)")
        if self.dtype not in ("auto", "bfloat16", "float32"):
            raise ValueError("dtype must be auto, bfloat16 or float32")
        if self.num_layers < 1 or self.repeats < 1:
            raise ValueError("num_layers and repeats must be >= 1")


def run(cfg: DecodeAttentionBenchConfig) -> dict:
    import os

    import torch

    from adadepth.benchmarks.machine import machine_info, median_ms, save_report
    from adadepth.config import ModelConfig
    from adadepth.hardware import auto_dtype
    from adadepth.kernels.cpu_ops import load_cpu_ops

    ops = load_cpu_ops(os.path.join(ModelConfig().cache_dir, "extensions"))
    if ops is None:
        raise SystemExit("the C++ CPU kernels did not build here (see the warning logged)")
    dtype = getattr(torch, auto_dtype("cpu") if cfg.dtype == "auto" else cfg.dtype)
    g = torch.Generator().manual_seed(0)
    bs, H, Hkv, Dh = 16, 9, 3, 64
    rows_out = []
    for n, length in cfg.case_list:
        nblk = -(-length // bs)
        num_blocks = n * nblk + 8
        caches = [(torch.randn(num_blocks, bs, Hkv, Dh, generator=g).to(dtype),     # (num_blocks, bs, Hkv, Dh)
                   torch.randn(num_blocks, bs, Hkv, Dh, generator=g).to(dtype)) for _ in range(cfg.num_layers)]
        table = torch.randperm(num_blocks, generator=g)[: n * nblk].view(n, nblk)   # (n, nblk), shuffled
        lens = torch.full((n,), length, dtype=torch.long)
        q = torch.randn(n, H, Dh, generator=g).to(dtype)                              # (n, H, Dh)
        cold = median_ms(lambda: [ops.paged_attention(q, k, v, table, lens, Dh ** -0.5) for k, v in caches],
                         cfg.repeats, warmup=1)
        k0, v0 = caches[0]
        warm = median_ms(lambda: [ops.paged_attention(q, k0, v0, table, lens, Dh ** -0.5)
                                  for _ in range(cfg.num_layers)], cfg.repeats, warmup=1)
        kv_bytes = cfg.num_layers * n * length * Hkv * Dh * 2 * torch.finfo(dtype).bits // 8
        rows_out.append({"rows": n, "context": length, "kv_mb": kv_bytes / 1e6, "cold_ms": cold, "warm_ms": warm,
                         "cold_gb_s": kv_bytes / cold / 1e6, "warm_gb_s": kv_bytes / warm / 1e6})
        print(f"{n:3d} rows x {length:4d} positions: cold {cold:7.2f} ms ({kv_bytes / cold / 1e6:5.1f} GB/s), "
              f"warm {warm:7.2f} ms ({kv_bytes / warm / 1e6:5.1f} GB/s)", flush=True)
    machine = machine_info()
    report = {"benchmark": "decode_attention", "label": cfg.label, "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench decode-attention " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items() if v != ""),
              "machine": machine, "dtype": str(dtype).replace("torch.", ""),
              "heads": {"num_heads": H, "num_kv_heads": Hkv, "head_dim": Dh, "block_size": bs}, "cases": rows_out}
    path = save_report(report, cfg.out)
    print(f"wrote {path}")
    return report


def add_parser(subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(subparsers, "decode-attention", DecodeAttentionBenchConfig, run,
                       help="paged decode attention: context read speed, cold and warm")
