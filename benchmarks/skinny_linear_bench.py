"""`adadepth bench skinny`: decode steps with the small-batch matmul kernels against oneDNN alone.

The kernels: skinny (bf16, 1-4 rows, plain weight; AVX512-BF16) and paired (up to
`PackedLinear.paired_max_rows` rows, a packed copy; bf16 past the skinny kernel's rows with
AVX512-BF16, float32 from one row with AVX2). One engine, decoding `batch` held-out prompts at full depth; the two
matmul paths take turns
(`--rounds` rounds of `--steps` timed steps each, after warm-up steps), so both see the same
machine, contexts and neighbours. Reports each round's median step time and the ratio of the
medians over all rounds. bf16 needs a CPU with AVX512-BF16, float32 one with AVX2 and FMA.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SkinnyBenchConfig:
    model: str = field(default="default", metadata={"help": "model to run"})
    dtype: str = field(default="bfloat16", metadata={
        "help": "bfloat16 (skinny and paired kernels) or float32 (paired kernel)"})
    batches: str = field(default="1,2,4,8,16,32,48,64", metadata={
        "help": "comma-separated decode batch sizes (1..PackedLinear.paired_max_rows)"})
    rounds: int = field(default=4, metadata={"help": "rounds per path, the paths alternating"})
    steps: int = field(default=20, metadata={"help": "timed decode steps per round"})
    prompts: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl (messages lines); a relative path is taken from the repository root"})
    out: str = field(default="benchmarks/results/skinny_linear.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        self.batch_list = [int(b) for b in self.batches.split(",") if b.strip()]
        from adadepth.model.packed_linear import PackedLinear

        if self.dtype not in ("bfloat16", "float32"):
            raise ValueError("dtype must be bfloat16 or float32")
        most = PackedLinear.paired_max_rows
        if not self.batch_list or any(not 1 <= b <= most for b in self.batch_list):
            raise ValueError(f"batches must be in 1..{most} (past {most} rows oneDNN runs either way)")
        if self.rounds < 1 or self.steps < 1:
            raise ValueError("rounds and steps must be >= 1")


def run(cfg: SkinnyBenchConfig) -> dict:
    import torch

    from adadepth import LLM, SamplingParams
    from adadepth.benchmarks.machine import machine_info, median_ms, save_report
    from adadepth.benchmarks.step_profile import load_chats
    from adadepth.model.packed_linear import PackedLinear

    llm = LLM(cfg.model, dtype=cfg.dtype, num_kv_tokens=32768)
    engine = llm.engine
    # Both paths through the Python layer loop: the C++ loop runs only with the kernels on, and would
    # add its own gain to theirs (`adadepth bench step --loop-ab-rounds` measures that one).
    engine.model.fused_decode = None
    linears = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
    dtype = engine.model.embed_tokens.weight.dtype
    bf16 = dtype == torch.bfloat16
    skinny = next((m.skinny for m in linears if m.skinny is not None), None)
    paired = next((m.paired for m in linears if m.takes_paired(dtype)), None)
    dtypes = next((m.paired_dtypes for m in linears if m.paired is not None), ())
    if paired is None or (skinny is None and bf16):
        raise SystemExit(f"the small-batch {cfg.dtype} kernels are not in use here (bf16 needs AVX512-BF16, "
                         "float32 AVX2; or no C++ compiler, or --no-cpu-kernels)")
    prompts = Path(cfg.prompts)
    chats = load_chats(prompts if prompts.is_absolute() else REPO_ROOT / prompts, max(cfg.batch_list))
    ids = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False),
                                add_special_tokens=False) for c in chats]
    # Rows that joined first decode while the last prompts are prefilled: room for those steps too.
    budget = 2 * cfg.rounds * (cfg.steps + 3) + 8 + 256
    cases = {}
    for batch in cfg.batch_list:
        for i in range(batch):
            engine.add_request(f"skinny-{batch}-{i}", ids[i], SamplingParams(max_tokens=budget, temperature=0,
                                                                          ignore_eos=True))
        while engine.scheduler.waiting or any(not s.output_token_ids for s in engine.scheduler.running):
            engine.step()                                                       # the prefill (maybe chunked)
        rounds = {"kernels": [], "onednn": []}
        for r in range(2 * cfg.rounds):
            path = "kernels" if r % 2 == 0 else "onednn"
            for m in linears:
                m.use_skinny(skinny if path == "kernels" else None)
                m.use_paired(paired if path == "kernels" else None, dtypes)
            rounds[path].append(median_ms(engine.step, cfg.steps, warmup=3))
        for m in linears:
            m.use_skinny(skinny)
            m.use_paired(paired, dtypes)
        while engine.has_unfinished_requests():
            for seq in list(engine.seqs):
                engine.abort_request(seq)
            engine.step()
        kernels, onednn = statistics.median(rounds["kernels"]), statistics.median(rounds["onednn"])
        kernel = "skinny" if bf16 and batch <= PackedLinear.skinny_max_rows else "paired"
        cases[str(batch)] = {"kernel": kernel, "step_ms_per_round": rounds,
                             "step_ms_median": {"kernels": kernels, "onednn": onednn}, "speedup": onednn / kernels,
                             "decode_tok_s": {"kernels": 1000 * batch / kernels, "onednn": 1000 * batch / onednn}}
        print(f"batch {batch}: step {kernels:.1f} ms with the {kernel} kernel, {onednn:.1f} ms with oneDNN alone "
              f"(x{onednn / kernels:.2f}); rounds {[round(x, 1) for x in rounds['kernels']]} vs "
              f"{[round(x, 1) for x in rounds['onednn']]}", flush=True)
    machine = machine_info()
    report = {"benchmark": "skinny_linear", "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench skinny " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                            dataclasses.asdict(cfg).items()),
              "machine": machine, "dtype": str(engine.dtype), "model": cfg.model, "cases": cases}
    path = save_report(report, cfg.out, plot)
    print(f"wrote {path}")
    return report


def plot(report: dict, png) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from adadepth.benchmarks.machine import finish_plot

    batches = list(report["cases"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, (path, label) in enumerate([("onednn", "oneDNN alone"), ("kernels", "skinny (<= 4 rows) / paired kernel")]):
        ax.bar([i + (k - 0.5) * width for i in range(len(batches))],
               [report["cases"][b]["step_ms_median"][path] for b in batches], width, label=label)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode step, ms (median of rounds)")
    finish_plot(fig, ax, f"{report['model']} {report['dtype'].removeprefix('torch.')}", report["machine"], png)


def add_parser(subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(subparsers, "skinny", SkinnyBenchConfig, run,
                       help="decode steps: the small-batch matmul kernels against oneDNN alone")
