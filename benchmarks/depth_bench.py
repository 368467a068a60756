"""`adadepth bench depth`: decode latency and throughput versus depth, with transformers' `generate`
at full depth as the baseline, all in one run (ratios from one run: the machine is shared).

Ideal speedup: time(d) ∝ d · (layer FLOPs) + (embedding and LM-head FLOPs), anchored at full depth.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field

from adadepth.benchmarks.machine import machine_info


@dataclass
class DepthBenchConfig:
    model: str = field(default="default-base", metadata={"help": "model to benchmark"})
    data: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl (messages lines, or GSM8K question lines); a relative path is taken from the repository root"})
    batch_sizes: str = field(default="1,16", metadata={"help": "comma-separated batch sizes"})
    fractions: str = field(default="1.0,0.9,0.8,0.7,0.6,0.5", metadata={"help": "depths as fractions of L"})
    max_tokens: int = field(default=128, metadata={"help": "output tokens per request"})
    repeats: int = field(default=1, metadata={"help": "timed repetitions per point (best is kept)"})
    num_threads: int = field(default=0, metadata={"help": "torch threads; 0 keeps torch's default"})
    skip_hf: bool = field(default=False, metadata={"help": "skip the transformers baseline"})
    out: str = field(default="benchmarks/results/depth_cpu.json", metadata={"help": "JSON output; PNG beside it"})

    def __post_init__(self) -> None:
        if self.max_tokens < 1 or self.repeats < 1:
            raise ValueError("max_tokens and repeats must be >= 1")
        if any(not 0 < float(f) <= 1 for f in self.fractions.split(",")):
            raise ValueError("fractions must be in (0, 1]")


def load_prompts(path: str, n: int, tokenizer) -> list[str]:
    """n chat prompts, as `adadepth bench serve` takes them (the shipped held-out prompts by default)."""
    from pathlib import Path

    from adadepth.benchmarks.serve_bench import REPO_ROOT, load_conversations

    file = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    return [tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            for chat in load_conversations(file, n)]


def flop_model(config, context_len: int = 0) -> tuple[float, float]:
    """(FLOPs per token of one layer, FLOPs per token outside the layers): the matmuls, plus,
    for a token attending to context_len positions, attention's q.k and p.v products."""
    d, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    layer = 2 * (d * (q + 2 * kv) + q * d + 3 * d * i) + 4 * q * context_len
    head = 2 * d * config.vocab_size
    return float(layer), float(head)


def time_engine(llm, prompts, params, repeats) -> dict:
    best = None
    for _ in range(repeats):
        engine = llm.engine
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, sp)
        step_times, t0 = [], time.perf_counter()
        prefill_s = 0.0
        while engine.has_unfinished_requests():
            ts = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - ts
            if engine.last_step.is_prefill:
                prefill_s += dt
            else:
                step_times.append(dt)
        total = time.perf_counter() - t0
        tokens = sum(sp.max_tokens for sp in params)
        result = {"total_s": total, "output_tok_per_s": tokens / total, "prefill_s": prefill_s,
                  "decode_step_ms": 1000 * sum(step_times) / max(1, len(step_times)),
                  "decode_tok_per_s": len(prompts) * len(step_times) / max(1e-9, sum(step_times))}
        if best is None or result["total_s"] < best["total_s"]:
            best = result
    return best


def time_hf(model, tokenizer, prompts, max_tokens, repeats) -> dict:
    import torch

    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    best = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        total = time.perf_counter() - t0
        assert out.shape[1] - batch.input_ids.shape[1] == max_tokens
        result = {"total_s": total, "output_tok_per_s": len(prompts) * max_tokens / total}
        if best is None or total < best["total_s"]:
            best = result
    return best


def run(cfg: DepthBenchConfig) -> dict:
    import torch

    from adadepth import LLM, SamplingParams

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    batch_sizes = [int(b) for b in cfg.batch_sizes.split(",")]
    # No prefix cache: prompts come round again here, and each run must compute its own.
    llm = LLM(cfg.model, num_kv_tokens=max(8192, max(batch_sizes) * 1024), enable_prefix_caching=False)
    L = llm.num_layers
    depths = sorted({max(1, round(float(f) * L)) for f in cfg.fractions.split(",")}, reverse=True)
    layer_flops, head_flops = flop_model(llm.engine.model.config)
    prompts_all = load_prompts(cfg.data, max(batch_sizes), llm.tokenizer)
    # Prompt token ids without a second BOS: the chat template already holds the special tokens.
    ids_all = [llm.tokenizer.encode(p, add_special_tokens=False) for p in prompts_all]
    warm = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate(ids_all[:2], warm)

    rows = []
    for b in batch_sizes:
        ids = ids_all[:b]
        # Warm up at this batch size (first-touch of its activation and KV memory), as for transformers below.
        llm.generate(ids, warm)
        for depth in depths:
            params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=0, ignore_eos=True, depth=depth)] * b
            r = time_engine(llm, ids, params, cfg.repeats)
            rows.append({"system": "adadepth", "batch": b, "depth": depth, **r})
            print(f"adadepth  batch={b:3d} depth={depth:2d}  {r['output_tok_per_s']:8.1f} tok/s  "
                  f"decode step {r['decode_step_ms']:7.1f} ms", flush=True)
    # Mixed batch: depths spread evenly over the fractions, every request different from its neighbour.
    b = max(batch_sizes)
    mixed = [depths[i % len(depths)] for i in range(b)]
    params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=0, ignore_eos=True, depth=d) for d in mixed]
    r = time_engine(llm, ids_all[:b], params, cfg.repeats)
    rows.append({"system": "adadepth", "batch": b, "depth": "mixed", "depths": mixed,
                 "mean_depth": sum(mixed) / b, **r})
    print(f"adadepth  batch={b:3d} mixed (mean depth {sum(mixed) / b:.1f})  {r['output_tok_per_s']:8.1f} tok/s  "
          f"decode step {r['decode_step_ms']:7.1f} ms", flush=True)

    if not cfg.skip_hf:
        from transformers import AutoModelForCausalLM

        from adadepth.model.loader import resolve_model

        resolved = resolve_model(cfg.model, llm.engine.config.model.cache_dir)
        # Speed does not depend on weight values: the base checkpoint stands for any artifact on it.
        # The same dtype as the engine's (like for like).
        hf = AutoModelForCausalLM.from_pretrained(resolved.checkpoint_dir, dtype=llm.engine.dtype).eval()
        for b in batch_sizes:
            time_hf(hf, llm.tokenizer, prompts_all[:b], 4, 1)  # warm-up at this batch size
            r = time_hf(hf, llm.tokenizer, prompts_all[:b], cfg.max_tokens, cfg.repeats)
            rows.append({"system": "transformers.generate", "batch": b, "depth": L, **r})
            print(f"hf        batch={b:3d} depth={L:2d}  {r['output_tok_per_s']:8.1f} tok/s", flush=True)

    summary = summarize(rows, L, layer_flops, head_flops, batch_sizes)
    result = {"benchmark": "depth", "machine": machine_info(), "config": dataclasses.asdict(cfg),
              "dtype": {"adadepth": str(llm.engine.dtype), "transformers": str(llm.engine.dtype)},
              "model": cfg.model, "num_layers": L, "layer_order": llm.engine.plan.layer_order,
              "flops_per_token": {"layer": layer_flops, "outside_layers": head_flops},
              "rows": rows, "summary": summary}
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, os.path.splitext(cfg.out)[0] + ".png")
    print_summary(summary)
    return result


def ideal_speedup(depth: float, L: int, layer_flops: float, head_flops: float) -> float:
    return (L * layer_flops + head_flops) / (depth * layer_flops + head_flops)


def summarize(rows, L, layer_flops, head_flops, batch_sizes) -> dict:
    out = {}
    for b in batch_sizes:
        full = next(r for r in rows if r["system"] == "adadepth" and r["batch"] == b and r["depth"] == L)
        entries = []
        for r in rows:
            if r["system"] != "adadepth" or r["batch"] != b:
                continue
            depth = r["mean_depth"] if r["depth"] == "mixed" else r["depth"]
            # Decode is what depth shortens; compare decode step time (prefill reported separately).
            measured = full["decode_step_ms"] / r["decode_step_ms"]
            ideal = ideal_speedup(depth, L, layer_flops, head_flops)
            entries.append({"depth": r["depth"], "mean_depth": depth, "speedup": measured, "ideal": ideal,
                            "ratio_to_ideal": measured / ideal,
                            "end_to_end_speedup": r["output_tok_per_s"] / full["output_tok_per_s"]})
        hf = next((r for r in rows if r["system"] == "transformers.generate" and r["batch"] == b), None)
        out[str(b)] = {"vs_transformers_full_depth": full["output_tok_per_s"] / hf["output_tok_per_s"] if hf else None,
                       "depths": entries}
    return out


def print_summary(summary: dict) -> None:
    for b, s in summary.items():
        vs = s["vs_transformers_full_depth"]
        print(f"\nbatch {b}: full depth vs transformers.generate: {vs:.2f}x" if vs else f"\nbatch {b}:")
        print("  depth   speedup   ideal   measured/ideal")
        for e in s["depths"]:
            print(f"  {str(e['depth']):>6} {e['speedup']:8.2f} {e['ideal']:7.2f} {e['ratio_to_ideal']:10.2f}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = result["num_layers"]
    lf, hf = result["flops_per_token"]["layer"], result["flops_per_token"]["outside_layers"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for b, s in result["summary"].items():
        fixed = [e for e in s["depths"] if e["depth"] != "mixed"]
        full_ms = next(r["decode_step_ms"] for r in result["rows"]
                       if r["system"] == "adadepth" and str(r["batch"]) == b and r["depth"] == L)
        xs = [e["mean_depth"] for e in fixed]
        line, = ax.plot(xs, [full_ms / e["speedup"] for e in fixed], "o-", label=f"adadepth, batch {b}")
        grid = list(range(min(xs), L + 1))
        ax.plot(grid, [full_ms / ideal_speedup(d, L, lf, hf) for d in grid], "--", color=line.get_color(),
                alpha=0.6, label=f"FLOP-proportional ideal, batch {b}")
        for e in s["depths"]:
            if e["depth"] == "mixed":
                ax.plot([e["mean_depth"]], [full_ms / e["speedup"]], "*", ms=12, color=line.get_color(),
                        label=f"mixed-depth batch {b}")
    ax.set_xlabel("depth (layers run)")
    ax.set_ylabel("decode step latency (ms)")
    ax.set_title(f"{result['model']}: decode latency vs depth ({result['machine'].get('cpu', '')[:40]})", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(bench_sub) -> None:
    from adadepth.cli_args import add_dataclass_args, dataclass_from_args

    p = bench_sub.add_parser("depth", help="decode latency/throughput versus depth, with transformers baseline")
    add_dataclass_args(p, DepthBenchConfig)
    p.set_defaults(func=lambda args: run(dataclass_from_args(DepthBenchConfig, args)))
