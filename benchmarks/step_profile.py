"""`adadepth bench step`: where a decode step's time goes, per op (torch.profiler), at batch 1, 16
and 64 at full depth and in a mixed-depth batch, on the engine alone (no HTTP).

For each case: the prompts are prefilled, a few decode steps warm up, then `--steps` decode steps
are timed one by one (median, min and max) and a few more are profiled (the profiler slows the
steps it records, so its table tells shares, the timed steps tell time). The prompts are the
shipped held-out ones, each row a different prompt (so rows have different context lengths).
Uses only the offline API, so the same script measures older versions of the engine too.

`--loop-ab-rounds N` also times, per case, N rounds of `--steps` steps with the C++ layer loop
(adadepth.model.fused_decode) and with the Python loop in turn, in the same process on the same
sequences, so the ratio is free of the machine's drift between runs.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name: (batch, depths as fractions of the layers, cycled over the rows: 30/24/21/18 of 30)
    "batch1": (1, [1.0]), "batch16": (16, [1.0]), "batch64": (64, [1.0]), "mixed16": (16, [1.0, 0.8, 0.7, 0.6]),
}


def load_chats(path: Path, count: int | None) -> list[list[dict]]:
    """`count` conversations (None: all), one source after another (as the serving benchmark takes them)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_source: dict[str, list] = {}
    for row in rows:
        by_source.setdefault(row.get("source"), []).append(row["messages"])
    mixed = [m for turn in itertools.zip_longest(*by_source.values()) for m in turn if m is not None]
    if count is None:
        return mixed
    if len(mixed) < count:
        raise ValueError(f"{path} has {len(mixed)} prompts, {count} needed")
    return mixed[:count]


def loop_ab(engine, steps: int, rounds: int) -> dict | None:
    """Median step time with the C++ layer loop and with the Python loop, alternating (None: the
    engine has no C++ loop)."""
    model = engine.model
    fused = model.fused_decode
    if fused is None or rounds < 1:
        return None
    ms = {"cpp": [], "python": []}
    try:
        for r in range(rounds):
            for name in (("cpp", "python") if r % 2 == 0 else ("python", "cpp")):
                model.fused_decode = fused if name == "cpp" else None
                times = []
                for _ in range(steps):
                    t0 = time.perf_counter()
                    engine.step()
                    times.append(time.perf_counter() - t0)
                ms[name].append(1000 * statistics.median(times))
    finally:
        model.fused_decode = fused
    ratios = [p / c for p, c in zip(ms["python"], ms["cpp"])]
    return {"cpp_step_ms": ms["cpp"], "python_step_ms": ms["python"], "python_over_cpp": ratios,
            "python_over_cpp_median": statistics.median(ratios)}


def profile_case(llm, chats: list[list[dict]], fractions: list[float], steps: int, profiled: int,
                 ab_rounds: int = 0) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from adadepth import SamplingParams

    engine = llm.engine
    num_layers = llm.num_layers
    # Token ids without a second BOS: the chat template already holds the special tokens.
    ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for c in chats]
    row_depths = [max(1, round(fractions[i % len(fractions)] * num_layers)) for i in range(len(ids))]
    # Room for the steps that finish the prefill too: prompts past one step's token budget join
    # in chunks while the first ones already decode, and no row may finish before the timed steps.
    budget = steps * (1 + 2 * ab_rounds) + profiled + 8 + 256
    for i, (prompt, depth) in enumerate(zip(ids, row_depths)):
        engine.add_request(f"step-profile-{time.monotonic_ns()}-{i}", prompt,
                           SamplingParams(max_tokens=budget, temperature=0, ignore_eos=True, depth=depth))
    while engine.scheduler.waiting or any(not s.output_token_ids for s in engine.scheduler.running):
        engine.step()                                                           # prefill
    if len(engine.scheduler.running) != len(ids):
        raise RuntimeError(f"{len(engine.scheduler.running)} of {len(ids)} rows are decoding (KV cache too small?)")
    for _ in range(3):
        engine.step()                                                           # warm decode steps
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profiled):
            engine.step()
    ab = loop_ab(engine, steps, ab_rounds)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    table = [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1000 / profiled,
              "share": e.self_cpu_time_total / total, "calls_per_step": e.count / profiled} for e in ops[:14]]
    while engine.has_unfinished_requests():
        for seq in list(engine.seqs):
            engine.abort_request(seq)
        engine.step()
    median = statistics.median(times)
    return {"batch": len(ids), "depths": sorted(set(row_depths), reverse=True),
            "mean_depth": sum(row_depths) / len(row_depths),
            "step_ms": {"median": 1000 * median, "min": 1000 * min(times), "max": 1000 * max(times)},
            "decode_tok_s": len(ids) / median, "profiled_steps": profiled,
            "profiled_ms_per_step": total / 1000 / profiled, "ops": table, "loop_ab": ab}


@dataclass
class StepProfileConfig:
    model: str = field(default="default", metadata={"help": "model to profile"})
    dtype: str | None = field(default=None, metadata={"help": "engine dtype (none: the engine's default)"})
    weight_dtype: str | None = field(default=None, metadata={
        "help": "engine weight_dtype (none: the engine's default; float32 models only)"})
    cases: str = field(default=",".join(CASES), metadata={"help": f"comma-separated, of {', '.join(CASES)}"})
    steps: int = field(default=24, metadata={"help": "timed decode steps per case"})
    profiled_steps: int = field(default=6, metadata={"help": "decode steps recorded by torch.profiler per case"})
    prompts: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl (messages lines); a relative path is taken from the repository root"})
    loop_ab_rounds: int = field(default=0, metadata={
        "help": "rounds of --steps steps with the C++ layer loop and the Python loop in turn, per case (0: none)"})
    label: str = field(default="", metadata={"help": "names this run in the JSON (e.g. the version measured)"})
    out: str = field(default="benchmarks/results/step_profile.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        self.case_list = [c.strip() for c in self.cases.split(",") if c.strip()]
        unknown = [c for c in self.case_list if c not in CASES]
        if unknown or not self.case_list:
            raise ValueError(f"unknown cases {unknown}; known: {', '.join(CASES)}")
        if self.steps < 1 or self.profiled_steps < 1:
            raise ValueError("steps and profiled_steps must be >= 1")
        if self.loop_ab_rounds < 0:
            raise ValueError("loop_ab_rounds must be >= 0")


def run(cfg: StepProfileConfig) -> dict:
    from adadepth import LLM

    cases = cfg.case_list
    # No prefix cache: prompts come round again here, and each run must compute its own.
    options = {"num_kv_tokens": 65536, "enable_prefix_caching": False}
    if cfg.dtype:
        options["dtype"] = cfg.dtype
    if cfg.weight_dtype:
        options["weight_dtype"] = cfg.weight_dtype
    llm = LLM(cfg.model, **options)
    prompts = Path(cfg.prompts)
    chats = load_chats(prompts if prompts.is_absolute() else REPO_ROOT / prompts, max(CASES[c][0] for c in cases))
    results = {}
    for name in cases:
        batch, depths = CASES[name]
        results[name] = profile_case(llm, chats[:batch], depths, cfg.steps, cfg.profiled_steps, cfg.loop_ab_rounds)
        r = results[name]
        print(f"{name:>8}: step {r['step_ms']['median']:7.2f} ms (min {r['step_ms']['min']:.2f}, max "
              f"{r['step_ms']['max']:.2f}), {r['decode_tok_s']:7.1f} tok/s; top ops: "
              + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in r["ops"][:4]), flush=True)
        if r["loop_ab"]:
            print(f"{'':>8}  Python loop / C++ loop: " + ", ".join(f"{x:.2f}" for x in r["loop_ab"]["python_over_cpp"])
                  + f" (median {r['loop_ab']['python_over_cpp_median']:.2f})", flush=True)
    from adadepth.benchmarks.machine import machine_info

    machine = machine_info()
    report = {"benchmark": "step_profile", "label": cfg.label, "date": machine["date"], "commit": machine["commit"],
              "config": dataclasses.asdict(cfg), "machine": machine, "dtype": str(llm.engine.dtype), "cases": results}
    out = Path(cfg.out)
    out = out if out.is_absolute() else REPO_ROOT / out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    if any(r["loop_ab"] for r in results.values()):
        plot_loop_ab(report, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.png')}")
    return report


def plot_loop_ab(report: dict, png) -> None:
    """Each case's step time with the C++ and the Python layer loop (median of the rounds, min-max bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adadepth.benchmarks.machine import finish_plot

    cases = [name for name, r in report["cases"].items() if r["loop_ab"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, (key, label) in enumerate([("python_step_ms", "Python layer loop"), ("cpp_step_ms", "C++ layer loop")]):
        values = [report["cases"][c]["loop_ab"][key] for c in cases]
        mid = [statistics.median(v) for v in values]
        ax.bar([i + (k - 0.5) * width for i in range(len(cases))], mid, width, label=label,
               yerr=[[m - min(v) for m, v in zip(mid, values)], [max(v) - m for m, v in zip(mid, values)]], capsize=3)
    ax.set_xticks(range(len(cases)), cases)
    ax.set_ylabel("decode step, ms (rounds: median, min-max)")
    finish_plot(fig, ax, f"{report['config']['model']} {report['dtype']}", report["machine"], png)


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "step", StepProfileConfig, run,
                       help="decode step time per op (torch.profiler), engine only")


if __name__ == "__main__":
    import argparse

    from adadepth.cli_args import add_dataclass_args, dataclass_from_args

    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_dataclass_args(cli, StepProfileConfig)
    run(dataclass_from_args(StepProfileConfig, cli.parse_args()))
