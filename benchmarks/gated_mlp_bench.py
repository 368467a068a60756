"""`adadepth bench gated-mlp`: prefill steps with SiLU-and-multiply in oneDNN's epilogues against the
separate op.

A prefill-sized step sends every gate/up product to oneDNN (more rows than the paired kernel
takes). Fused (`PackedLinear.silu_and_mul`): two products on the weight's halves, the gate's with a
SiLU epilogue, the up one multiplied by it; separate: one product writes the whole (rows, 2I)
output and the SiLU-and-multiply kernel reads it back. One engine, the two ways taking turns
(`--rounds` rounds of `--steps` prefill steps of `--prompts-per-step` held-out chat prompts each),
so both see the same machine, prompts and neighbours. Reports each round's median step time and
the ratio of the medians over all rounds. Both ways run the Python layer loop. The op-level case
(`--mlp-rows`) times only every layer's gate/up product with its SiLU-and-multiply, the two ways
alternating pass by pass: whole prefill steps on a shared 2-core machine vary more between rounds
than the few percent of a step this part takes.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class GatedMlpBenchConfig:
    model: str = field(default="default", metadata={"help": "model to run"})
    dtype: str = field(default="auto", metadata={"help": "engine dtype (auto: bf16 where the CPU has it)"})
    prompts_per_step: str = field(default="4,16", metadata={
        "help": "comma-separated: prompts prefilled together in one step, one case each"})
    rounds: int = field(default=4, metadata={"help": "rounds per way, the two alternating"})
    steps: int = field(default=3, metadata={"help": "timed prefill steps per round"})
    prompts: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl (messages lines); a relative path is taken from the repository root"})
    mlp_rows: str = field(default="512,2048", metadata={
        "help": "comma-separated: rows of the op-level case (every layer's gate/up and SiLU-and-multiply "
                "on random activations, nothing else), one case each"})
    mlp_rounds: int = field(default=10, metadata={"help": "rounds per way of the op-level case"})
    out: str = field(default="benchmarks/results/gated_mlp.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        self.counts = [int(c) for c in self.prompts_per_step.split(",") if c.strip()]
        self.rows = [int(r) for r in self.mlp_rows.split(",") if r.strip()]
        if any(r < 1 for r in self.rows) or self.mlp_rounds < 1:
            raise ValueError("mlp_rows must list counts >= 1 and mlp_rounds be >= 1")
        if not self.counts or any(c < 1 for c in self.counts):
            raise ValueError("prompts_per_step must list counts >= 1")
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("rounds and steps must be >= 1")


def run(cfg: GatedMlpBenchConfig) -> dict:
    import torch

    from adadepth import LLM, SamplingParams
    from adadepth.benchmarks.machine import machine_info, save_report
    from adadepth.benchmarks.step_profile import load_chats
    from adadepth.model.packed_linear import PackedLinear

    # No prefix cache: prompts come round again here, and each run must compute its own.
    llm = LLM(cfg.model, dtype=cfg.dtype, num_kv_tokens=65536, max_num_batched_tokens=8192,
              enable_prefix_caching=False)
    engine = llm.engine
    # Both ways through the Python layer loop: the C++ loop always fuses, so with it on the separate
    # way's steps would also leave it and pay the Python loop's overhead.
    engine.model.fused_decode = None
    gate_ups = [layer.gate_up_proj for layer in engine.model.layers]
    if not all(isinstance(g, PackedLinear) for g in gate_ups):
        raise SystemExit("the model's matmuls are not oneDNN's here (a build without oneDNN)")
    prompts = Path(cfg.prompts)
    chats = load_chats(prompts if prompts.is_absolute() else REPO_ROOT / prompts, None)
    ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for c in chats]
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    cursor = 0

    def use_way(way: str) -> None:
        for g in gate_ups:
            g.fuse_gate = way == "fused"

    def prefill_step(count: int) -> tuple[float, int]:
        """One step prefilling `count` fresh prompts (the next ones, cycling): (ms, prompt tokens)."""
        nonlocal cursor
        for i in range(count):
            engine.add_request(f"gated-{cursor}-{i}", ids[(cursor + i) % len(ids)], params)
        cursor += count
        t0 = time.perf_counter()
        engine.step()
        ms = (time.perf_counter() - t0) * 1e3
        tokens = engine.last_step.num_prompt_tokens
        while engine.has_unfinished_requests():
            engine.step()
        return ms, tokens

    cases = {}
    for count in cfg.counts:
        prefill_step(count)                                                      # warm-up (and weight copies)
        rounds: dict[str, list[float]] = {"fused": [], "separate": []}
        tokens: list[int] = []
        for r in range(2 * cfg.rounds):
            way = "fused" if r % 2 == 0 else "separate"
            use_way(way)
            prefill_step(count)                                                  # this way's first step: untimed
            timed = [prefill_step(count) for _ in range(cfg.steps)]
            rounds[way].append(statistics.median(ms for ms, _ in timed))
            tokens += [t for _, t in timed]
        use_way("fused")
        fused, separate = statistics.median(rounds["fused"]), statistics.median(rounds["separate"])
        mean_tokens = statistics.mean(tokens)
        cases[str(count)] = {"prompts": count, "mean_prompt_tokens_per_step": mean_tokens,
                             "step_ms_per_round": rounds, "step_ms_median": {"fused": fused, "separate": separate},
                             "speedup": separate / fused,
                             "prefill_tok_s": {"fused": 1000 * mean_tokens / fused,
                                               "separate": 1000 * mean_tokens / separate}}
        print(f"{count} prompts (~{mean_tokens:.0f} tokens) per step: {fused:.1f} ms fused, {separate:.1f} ms "
              f"separate (x{separate / fused:.3f}); rounds {[round(x, 1) for x in rounds['fused']]} vs "
              f"{[round(x, 1) for x in rounds['separate']]}", flush=True)
    ops = {}
    reference = engine.model.layers[0].ops.silu_and_mul
    dim = gate_ups[0].in_features
    for rows in cfg.rows:
        # Every layer in turn, as a step runs them: each weight comes cold from memory.
        x = torch.randn(rows, dim).to(engine.dtype)                              # (rows, D)

        @torch.inference_mode()  # as the engine runs: autograd-able weights would take F.linear
        def every_layer() -> None:
            for g in gate_ups:
                g.silu_and_mul(x, reference)                                     # (rows, D) -> (rows, I)

        times: dict[str, list[float]] = {"fused": [], "separate": []}
        for r in range(2 * cfg.mlp_rounds + 2):
            way = "fused" if r % 2 == 0 else "separate"
            use_way(way)
            t0 = time.perf_counter()
            every_layer()
            if r >= 2:                                                           # the first of each way: warm-up
                times[way].append((time.perf_counter() - t0) * 1e3)
        use_way("fused")
        fused, separate = statistics.median(times["fused"]), statistics.median(times["separate"])
        ops[str(rows)] = {"rows": rows, "ms_per_round": times, "ms_median": {"fused": fused, "separate": separate},
                          "speedup": separate / fused}
        print(f"{rows} rows, gate/up + SiLU-and-multiply of all {len(gate_ups)} layers: {fused:.1f} ms fused, "
              f"{separate:.1f} ms separate (x{separate / fused:.3f})", flush=True)
    machine = machine_info()
    report = {"benchmark": "gated_mlp", "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench gated-mlp " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items() if v is not None),
              "machine": machine, "dtype": str(engine.dtype), "model": cfg.model, "cases": cases, "ops": ops}
    path = save_report(report, cfg.out, plot)
    print(f"wrote {path}")
    return report


def plot(report: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adadepth.benchmarks.machine import finish_plot

    counts = list(report["cases"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, (way, label) in enumerate([("separate", "separate SiLU-and-multiply"), ("fused", "in oneDNN's epilogues")]):
        ax.bar([i + (k - 0.5) * width for i in range(len(counts))],
               [report["cases"][c]["prefill_tok_s"][way] for c in counts], width, label=label)
    ax.set_xticks(range(len(counts)), [f"{c} prompts/step" for c in counts])
    ax.set_ylabel("prefill tokens/s (median of rounds)")
    finish_plot(fig, ax, f"{report['model']} {report['dtype']}", report["machine"], png)


def add_parser(subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(subparsers, "gated-mlp", GatedMlpBenchConfig, run,
                       help="prefill steps: SiLU-and-multiply in oneDNN's epilogues against the separate op")
