"""`adadepth bench structured`: JSON-schema outputs on held-out prompts at every depth, and what
the grammar costs a decode step.

1. Validity: each held-out prompt asks for a JSON object of one of three schemas (the schema is
   in the prompt, as users write it, and enforced by `structured_outputs`); greedy, at every
   depth. Each output must parse (Python's strict json) and validate against its schema.
2. Cost: the same 16 prompts run as 16 constrained rows and as 16 free rows (one engine, same
   depth); the decode steps with all 16 rows running are timed. Also timed on their own: the
   grammar work inside those steps (matchers filling bitmasks, masking logits, advancing).
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

SCHEMAS = [
    {"type": "object", "properties": {
        "answer": {"type": "string", "maxLength": 160},
        "steps": {"type": "integer", "minimum": 0, "maximum": 20}},
     "required": ["answer", "steps"], "additionalProperties": False},
    {"type": "object", "properties": {
        "summary": {"type": "string", "maxLength": 160},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 24}, "maxItems": 5},
        "tone": {"enum": ["positive", "neutral", "negative"]}},
     "required": ["summary", "keywords", "tone"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60},
        "items": {"type": "array", "maxItems": 6, "items": {
            "type": "object", "properties": {"item": {"type": "string", "maxLength": 40},
                                             "count": {"type": "integer", "minimum": 0, "maximum": 1000}},
            "required": ["item", "count"], "additionalProperties": False}}},
     "required": ["title", "items"], "additionalProperties": False},
]


@dataclass
class StructuredBenchConfig:
    model: str = field(default="default", metadata={"help": "model to measure"})
    dtype: str = field(default="auto", metadata={"help": "engine dtype (auto: the machine's best)"})
    prompts: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl (messages lines); a relative path is taken from the repository root"})
    max_prompts: int = field(default=48, metadata={"help": "first N prompts, mixed over sources"})
    depths: str = field(default="15,18,21,24,27,30", metadata={"help": "depths checked for validity"})
    max_tokens: int = field(default=512, metadata={"help": "output budget of a JSON answer"})
    cost_batch: int = field(default=16, metadata={"help": "rows in the cost comparison"})
    cost_tokens: int = field(default=64, metadata={"help": "tokens per row in the cost comparison"})
    cost_repeats: int = field(default=3, metadata={"help": "constrained/free pairs of runs, alternating"})
    out: str = field(default="benchmarks/results/structured_outputs.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_tokens", "cost_batch", "cost_tokens", "cost_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        self.depth_list  # validates

    @property
    def depth_list(self) -> list[int]:
        try:
            return sorted({int(d) for d in self.depths.split(",") if d.strip()})
        except ValueError:
            raise ValueError(f"depths must be comma-separated integers, got {self.depths!r}") from None


def json_prompt(messages: list[dict], schema: dict) -> list[dict]:
    """The conversation with the request for JSON added to its last user turn."""
    out = [dict(m) for m in messages]
    out[-1]["content"] += "\n\nReply with a JSON object that follows this JSON schema:\n" + json.dumps(schema)
    return out


def check(text: str, schema: dict) -> str | None:
    """None when text is valid JSON that follows schema, else why not."""
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), schema)
    except json.JSONDecodeError as exc:
        return f"not JSON: {exc.msg}"
    except jsonschema.ValidationError as exc:
        return f"schema: {exc.message}"
    return None


class GrammarTimer:
    """Seconds spent in the engine's grammar work (bitmasks and matcher advances), by wrapping
    the two methods that do it on this one engine object."""

    def __init__(self, engine):
        self.seconds = 0.0
        manager = engine.structured_outputs()
        for owner, name in ((manager, "apply_bitmask"), (engine, "_grammar_done")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - t0
        return wrapper


def decode_steps(engine, requests: list[tuple[list[int], object]], rows: int,
                 timer: GrammarTimer | None = None) -> tuple[list[float], list[float]]:
    """Run the requests to the end. For the decode steps that ran exactly `rows` rows: their
    durations, and (with a timer) the grammar seconds inside each."""
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"cost-{time.monotonic_ns()}-{i}", ids, params)
    durations, grammar = [], []
    while engine.has_unfinished_requests():
        before = timer.seconds if timer is not None else 0.0
        engine.step()
        step = engine.last_step
        if step is not None and not step.is_prefill and not step.num_chunks and step.num_seqs == rows:
            durations.append(step.duration_s)
            if timer is not None:
                grammar.append(timer.seconds - before)
    return durations, grammar


def run(cfg: StructuredBenchConfig) -> dict:
    from adadepth import LLM, SamplingParams
    from adadepth.benchmarks.machine import machine_info
    from adadepth.sampling_params import StructuredOutputsParams
    from adadepth.training.data import first_prompts, read_prompts_jsonl

    prompts_path = Path(cfg.prompts) if Path(cfg.prompts).is_absolute() else REPO_ROOT / cfg.prompts
    records = first_prompts(read_prompts_jsonl(str(prompts_path)), cfg.max_prompts)
    llm = LLM(cfg.model, dtype=cfg.dtype, max_num_seqs=max(64, cfg.cost_batch))
    tok = llm.tokenizer
    schemas = [SCHEMAS[i % len(SCHEMAS)] for i in range(len(records))]
    ids = [tok.encode(tok.apply_chat_template(json_prompt(r.messages, s), add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False) for r, s in zip(records, schemas)]
    t0 = time.perf_counter()
    by_depth, failures = [], []
    for depth in cfg.depth_list:
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=0.0, depth=depth,
                                 structured_outputs=StructuredOutputsParams(json=s)) for s in schemas]
        outs = llm.generate(ids, params)
        problems = [check(o.outputs[0].text, s) for o, s in zip(outs, schemas)]
        failures += [{"depth": depth, "prompt": i, "why": p, "text": outs[i].outputs[0].text[:300]}
                     for i, p in enumerate(problems) if p]
        by_depth.append({"depth": depth, "requests": len(outs), "valid": sum(p is None for p in problems),
                         "valid_share": sum(p is None for p in problems) / len(outs),
                         "cut_by_max_tokens": sum(o.outputs[0].finish_reason == "length" for o in outs),
                         "mean_output_tokens": statistics.mean(len(o.outputs[0].token_ids) for o in outs)})
        print(f"depth {depth:>2}: {by_depth[-1]['valid']}/{len(outs)} valid JSON")

    # Cost at full depth: constrained and free runs alternate so that machine noise hits both.
    engine = llm.engine
    timer = GrammarTimer(engine)
    batch = list(range(cfg.cost_batch))
    free = [(ids[i % len(ids)], SamplingParams(max_tokens=cfg.cost_tokens, temperature=0.0, ignore_eos=True))
            for i in batch]
    # Constrained rows end when their JSON does; only steps with all rows running count.
    constrained = [(ids[i % len(ids)], SamplingParams(max_tokens=cfg.cost_tokens, temperature=0.0,
                                                      structured_outputs=StructuredOutputsParams(json=schemas[i % len(ids)])))
                   for i in batch]
    free_steps, constrained_steps, grammar_per_step = [], [], []
    decode_steps(engine, free[:2], 2)  # warm-up
    for _ in range(cfg.cost_repeats):
        free_steps += decode_steps(engine, free, cfg.cost_batch)[0]
        durations, grammar = decode_steps(engine, constrained, cfg.cost_batch, timer)
        constrained_steps += durations
        grammar_per_step += grammar
    free_ms = statistics.median(free_steps) * 1e3
    constrained_ms = statistics.median(constrained_steps) * 1e3
    grammar_ms = statistics.median(grammar_per_step) * 1e3
    machine = machine_info()
    report = {
        "benchmark": "structured_outputs", "date": machine["date"], "commit": machine["commit"],
        "command": "adadepth bench structured " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                           dataclasses.asdict(cfg).items()),
        "config": dataclasses.asdict(cfg), "machine": machine, "engine_dtype": str(engine.dtype),
        "backend": "xgrammar", "schemas": SCHEMAS, "num_prompts": len(records), "validity": by_depth,
        "failures": failures[:20],
        "cost": {
            "rows": cfg.cost_batch, "depth": engine.num_layers,
            "free_step_ms_median": round(free_ms, 3), "constrained_step_ms_median": round(constrained_ms, 3),
            "step_overhead": round(constrained_ms / free_ms - 1, 4),
            "grammar_ms_per_step_median": round(grammar_ms, 3),
            "grammar_share_of_free_step": round(grammar_ms / free_ms, 4),
            "steps_measured": {"free": len(free_steps), "constrained": len(constrained_steps)},
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else REPO_ROOT / cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    c = report["cost"]
    print(f"decode step at {cfg.cost_batch} rows: free {free_ms:.1f} ms, constrained {constrained_ms:.1f} ms "
          f"({c['step_overhead']:+.1%}); grammar work {grammar_ms:.2f} ms/step = {c['grammar_share_of_free_step']:.1%} "
          f"of a free step\nwrote {out}")
    return report


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "structured", StructuredBenchConfig, run,
                       help="JSON-schema outputs: validity per depth, cost per step")
