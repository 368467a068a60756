"""`adadepth bench chunked`: what a long prompt arriving does to streams that are decoding, with
prompts prefilled whole (`--prefill-chunk-tokens 0`) and in chunks of several sizes.

Engine only (no HTTP, so the figures are the scheduler's, not the client's): `--streams` requests
decode (the shipped held-out prompts, full depth); every `--arrival-every` steps a prompt of
`--long-prompt-tokens` tokens arrives, `--long-prompts` in all. Reported per chunk size: the
decoding streams' time between tokens (p50, p99, max) while the long prompts come in, the long
prompts' time to first token, and the tokens the engine produced per second. One engine serves
every chunk size in turn (the same weights, the same cache), in one run.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from adadepth.benchmarks.step_profile import REPO_ROOT, load_chats


@dataclass
class ChunkedPrefillConfig:
    model: str = field(default="default", metadata={"help": "model to serve"})
    dtype: str | None = field(default=None, metadata={"help": "engine dtype (none: the engine's default)"})
    budgets: str = field(default="0,32,64,128", metadata={
        "help": "comma-separated prefill chunk sizes to compare (0: whole prompts)"})
    streams: int = field(default=16, metadata={"help": "requests decoding when the long prompts arrive"})
    long_prompts: int = field(default=4, metadata={"help": "long prompts arriving, one after another"})
    long_prompt_tokens: int = field(default=1024, metadata={"help": "tokens in each long prompt"})
    arrival_every: int = field(default=24, metadata={"help": "engine steps between two long prompts"})
    repeats: int = field(default=2, metadata={"help": "runs of each chunk size, alternating (medians reported)"})
    prompts: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl (messages lines); a relative path is taken from the repository root"})
    out: str = field(default="benchmarks/results/chunked_prefill.json", metadata={"help": "JSON output (+ .png)"})

    def __post_init__(self) -> None:
        self.budget_list = [int(b) for b in self.budgets.split(",") if b.strip()]
        if not self.budget_list or any(b < 0 for b in self.budget_list):
            raise ValueError("budgets: comma-separated integers >= 0")
        if min(self.streams, self.long_prompts, self.long_prompt_tokens, self.arrival_every, self.repeats) < 1:
            raise ValueError("streams, long_prompts, long_prompt_tokens, arrival_every and repeats must be >= 1")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_case(llm, budget: int, stream_ids: list[list[int]], long_ids: list[list[int]], every: int) -> dict:
    from adadepth import SamplingParams

    engine = llm.engine
    engine.scheduler.config.prefill_chunk_tokens = budget  # between runs: the engine is idle
    tag = time.monotonic_ns()
    # Enough tokens for the streams to outlast every arrival and every chunk of the long prompts.
    steps_needed = every * (len(long_ids) + 1) + sum(map(len, long_ids)) // max(budget, 1) + 16
    room = engine.max_model_len - max(map(len, stream_ids))
    stream_params = SamplingParams(max_tokens=min(steps_needed, room), temperature=0, ignore_eos=True)
    streams = {f"s{tag}-{i}" for i in range(len(stream_ids))}
    for rid, ids in zip(sorted(streams), stream_ids):
        engine.add_request(rid, ids, stream_params)
    while any(not s.output_token_ids for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()                                                          # the streams' prefill
    arrivals: dict[str, float] = {}
    first_token: dict[str, float] = {}
    last_seen: dict[str, float] = {}
    gaps: list[float] = []
    tokens, step, t_start = 0, 0, time.perf_counter()
    while len(first_token) < len(long_ids):
        if step % every == every - 1 and len(arrivals) < len(long_ids):
            rid = f"l{tag}-{len(arrivals)}"
            engine.add_request(rid, long_ids[len(arrivals)], SamplingParams(max_tokens=1, temperature=0))
            arrivals[rid] = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            tokens += len(out.outputs[0].token_ids)
            if out.request_id in streams:
                if out.request_id in last_seen:
                    gaps.append(now - last_seen[out.request_id])
                last_seen[out.request_id] = now
            elif out.request_id not in first_token:
                first_token[out.request_id] = now
        step += 1
        if not engine.has_unfinished_requests():
            raise RuntimeError("the streams finished before every long prompt was in: raise their max_tokens")
    elapsed = time.perf_counter() - t_start
    for rid in streams:
        engine.abort_request(rid)
    ttft = [first_token[r] - arrivals[r] for r in arrivals]
    return {"stream_itl_ms": {"p50": 1000 * _percentile(gaps, 0.5), "p99": 1000 * _percentile(gaps, 0.99),
                              "max": 1000 * max(gaps)},
            "long_prompt_ttft_ms": {"p50": 1000 * statistics.median(ttft), "max": 1000 * max(ttft)},
            "output_tok_s": tokens / elapsed, "prompt_tok_s": sum(map(len, long_ids)) / elapsed,
            "steps": step, "seconds": elapsed}


def _median_of(runs: list[dict]) -> dict:
    """Field by field median over repeats (nested dicts of numbers)."""
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = _median_of([r[key] for r in runs])
        else:
            out[key] = statistics.median(r[key] for r in runs)
    return out


def run(cfg: ChunkedPrefillConfig) -> dict:
    from adadepth import LLM

    # No prefix cache: prompts come round again here, and each run must compute its own.
    options = {"num_kv_tokens": 65536, "enable_prefix_caching": False}
    if cfg.dtype:
        options["dtype"] = cfg.dtype
    llm = LLM(cfg.model, **options)
    tok = llm.tokenizer
    prompts = Path(cfg.prompts)
    chats = load_chats(prompts if prompts.is_absolute() else REPO_ROOT / prompts, None)
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    ids = [tok.encode(t, add_special_tokens=False) for t in texts]
    stream_ids = ids[: cfg.streams]
    pool = [t for row in ids[cfg.streams:] for t in row]                       # later prompts, back to back
    n = cfg.long_prompt_tokens
    if len(pool) < n * cfg.long_prompts:
        raise ValueError(f"the prompts file holds {len(pool)} tokens beyond the streams, {n * cfg.long_prompts} needed")
    long_ids = [pool[i * n: (i + 1) * n] for i in range(cfg.long_prompts)]
    runs: dict[int, list[dict]] = {b: [] for b in cfg.budget_list}
    run_case(llm, cfg.budget_list[0], stream_ids, long_ids[:1], cfg.arrival_every)  # warm-up
    for r in range(cfg.repeats):
        order = cfg.budget_list if r % 2 == 0 else cfg.budget_list[::-1]
        for budget in order:
            runs[budget].append(run_case(llm, budget, stream_ids, long_ids, cfg.arrival_every))
    results = []
    for budget in cfg.budget_list:
        m = _median_of(runs[budget])
        results.append({"prefill_chunk_tokens": budget, **m, "runs": runs[budget]})
        print(f"chunk {budget:>4}: stream ITL p50 {m['stream_itl_ms']['p50']:6.1f} p99 {m['stream_itl_ms']['p99']:6.1f} "
              f"max {m['stream_itl_ms']['max']:6.1f} ms; long prompt TTFT p50 {m['long_prompt_ttft_ms']['p50']:6.0f} "
              f"max {m['long_prompt_ttft_ms']['max']:6.0f} ms; {m['output_tok_s']:6.1f} out tok/s", flush=True)
    from adadepth.benchmarks.machine import machine_info, save_report

    machine = machine_info()
    report = {"benchmark": "chunked_prefill", "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench chunked " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items() if v is not None),
              "config": dataclasses.asdict(cfg), "machine": machine, "dtype": str(llm.engine.dtype),
              "results": results}
    print(f"wrote {save_report(report, cfg.out, plot)}")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    labels = [str(r["prefill_chunk_tokens"]) if r["prefill_chunk_tokens"] else "whole" for r in rows]
    x = range(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for key, style in (("p50", "o-"), ("p99", "s-"), ("max", "^--")):
        a.plot(x, [r["stream_itl_ms"][key] for r in rows], style, label=f"ITL {key}")
    a.set_title("decoding streams: time between tokens")
    a.set_ylabel("ms")
    b.plot(x, [r["long_prompt_ttft_ms"]["p50"] for r in rows], "o-", label="TTFT p50")
    b.plot(x, [r["long_prompt_ttft_ms"]["max"] for r in rows], "^--", label="TTFT max")
    b.set_title(f"{report['config']['long_prompt_tokens']}-token prompts: time to first token")
    for ax in (a, b):
        ax.set_xticks(list(x), labels)
        ax.set_xlabel("prefill chunk (tokens)")
        ax.legend()
        ax.grid(alpha=0.3)
    cpu = report["machine"].get("cpu", "")
    fig.suptitle(f"chunked prefill, {report['config']['streams']} streams decoding ({cpu}, {report['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "chunked", ChunkedPrefillConfig, run,
                       help="long prompts arriving while streams decode: whole versus chunked prefill, "
                            "engine only")
