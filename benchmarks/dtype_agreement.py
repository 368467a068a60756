"""`adadepth bench dtype`: how often the engine in a reduced dtype (bf16), or in float32 on weights
rounded to float16 (`--dtype float32 --weight-dtype float16`), picks the same greedy tokens as in
float32 on the weights as loaded, at full depth, on the shipped held-out prompts.

For each prompt, the float32 engine writes its greedy continuation; then the prompt plus that
continuation is teacher-forced through both engines' models (each as the engine runs it: packed
matmuls and fused CPU kernels where available) and their argmax tokens are compared at every
continuation position. Also reported: the share of prompts whose free-running bf16 continuation
equals the float32 one token for token (a stricter figure: one early difference changes the rest).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class DtypeAgreementConfig:
    model: str = field(default="default", metadata={"help": "model to measure"})
    dtype: str = field(default="bfloat16", metadata={"help": "the reduced dtype compared with float32"})
    weight_dtype: str = field(default="auto", metadata={
        "help": "the reduced engine's weight_dtype (float16: a float32 engine on weights rounded to float16); "
                "the reference keeps float32 weights"})
    prompts: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl (messages lines); a relative path is taken from the repository root"})
    max_prompts: int = field(default=0, metadata={"help": "first N prompts, mixed over sources (0: all)"})
    max_tokens: int = field(default=64, metadata={"help": "continuation tokens per prompt"})
    batch_size: int = field(default=16, metadata={"help": "sequences per teacher-forced forward pass"})
    out: str = field(default="benchmarks/results/dtype_agreement.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        # float32 against itself must agree everywhere: a self-check of the alignment.
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")
        if self.weight_dtype not in ("auto", "float32", "float16") or (self.weight_dtype != "auto"
                                                                       and self.dtype != "float32"):
            raise ValueError("weight_dtype must be auto, or float32/float16 with dtype float32")
        if self.max_prompts < 0 or self.max_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_prompts must be >= 0, max_tokens and batch_size >= 1")


def teacher_forced_tokens(llm, sequences: list[list[int]], batch_size: int):
    """(B, T) argmax token at every position of each sequence, through the engine's model."""
    import torch

    from adadepth.training.sequence_forward import SequenceBatch, SequenceForward

    fwd = SequenceForward(llm.engine.model)
    out = []
    for start in range(0, len(sequences), batch_size):
        batch = SequenceBatch.build(sequences[start:start + batch_size], fwd.device)
        with torch.inference_mode():
            tokens = fwd.logits(fwd.final_states(batch, llm.num_layers)).argmax(-1)   # (B, T)
        out.extend(tokens[i, : len(s)].tolist() for i, s in enumerate(sequences[start:start + batch_size]))
    return out


def run(cfg: DtypeAgreementConfig) -> dict:
    from adadepth import LLM, SamplingParams
    from adadepth.training.data import first_prompts, read_prompts_jsonl

    prompts_path = Path(cfg.prompts) if Path(cfg.prompts).is_absolute() else REPO_ROOT / cfg.prompts
    records = read_prompts_jsonl(str(prompts_path))
    records = first_prompts(records, cfg.max_prompts or len(records))
    ref = LLM(cfg.model, dtype="float32", weight_dtype="float32")
    low = LLM(cfg.model, dtype=cfg.dtype, weight_dtype=cfg.weight_dtype)
    low_label = f"{cfg.dtype}, weights {low.engine.weight_dtype}".replace("torch.", "")
    tok = ref.tokenizer
    ids = [tok.encode(tok.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False),
                      add_special_tokens=False) for r in records]
    params = SamplingParams(max_tokens=cfg.max_tokens, temperature=0)
    t0 = time.perf_counter()
    ref_out = [o.outputs[0].token_ids for o in ref.generate(ids, params)]
    low_out = [o.outputs[0].token_ids for o in low.generate(ids, params)]
    sequences = [p + c for p, c in zip(ids, ref_out)]
    ref_tf = teacher_forced_tokens(ref, sequences, cfg.batch_size)
    low_tf = teacher_forced_tokens(low, sequences, cfg.batch_size)
    per_source: dict[str, list[int]] = {}
    same = total = 0
    for r, p, c, a, b in zip(records, ids, ref_out, ref_tf, low_tf):
        # Position j predicts token j + 1: the continuation is predicted at positions len(p)-1 .. end-1.
        span = range(len(p) - 1, len(p) - 1 + len(c))
        hits = sum(a[j] == b[j] for j in span)
        same, total = same + hits, total + len(c)
        counts = per_source.setdefault(r.source or "all", [0, 0])
        counts[0], counts[1] = counts[0] + hits, counts[1] + len(c)
    identical = sum(a == b for a, b in zip(ref_out, low_out))
    from adadepth.benchmarks.machine import machine_info, save_report

    machine = machine_info()
    report = {
        "benchmark": "dtype_agreement", "date": machine["date"], "commit": machine["commit"],
        "config": dataclasses.asdict(cfg), "machine": machine, "num_prompts": len(records),
        "compared": f"{low_label} against float32, weights float32",
        "teacher_forced_positions": total,
        "teacher_forced_agreement": same / total if total else None,
        "teacher_forced_agreement_by_source": {s: h / n for s, (h, n) in per_source.items() if n},
        "identical_free_running_continuations": identical / len(records) if records else None,
        "seconds": time.perf_counter() - t0,
    }
    out = save_report(report, cfg.out)
    print(f"{low_label} vs float32 at full depth, {len(records)} prompts: teacher-forced agreement "
          f"{report['teacher_forced_agreement']:.4f} over {total} positions; identical continuations "
          f"{report['identical_free_running_continuations']:.3f}\nwrote {out}")
    return report


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "dtype", DtypeAgreementConfig, run,
                       help="greedy tokens of a reduced dtype against float32 (held-out prompts)")
