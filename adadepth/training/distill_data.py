"""`adadepth distill-data`: the teacher's own greedy answers to train-split prompts, as a train file.

Why: `adadepth eval` scores a reduced depth on the *model's own* greedy continuations, but the
shared data's reference answers are human text (GSM8K's `<<48/2=24>>` calculator notes, one-word
T0 labels) that the model would never write. Distilling on what the full-depth teacher actually
generates (sequence-level knowledge distillation, Kim & Rush 2016) spends every scored training
position on the distribution that serving and evaluation see.

Output: JSONL, one line a prompt, readable by `adadepth train --train-file` (and by `adadepth eval`):
  {"messages": [...], "completion": <teacher text>, "finish_reason": "stop"|"length",
   "source": ..., "id": ..., "teacher": <model>}
Lines are appended a batch at a time and a rerun skips ids already written, so an interrupted
run continues where it stopped.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from adadepth.config import _default_cache_dir
from adadepth.training.data import DEFAULT_DATA_DIR, EVAL_MAX_PROMPT_CHARS, Split, prompt_set


@dataclass
class DistillDataConfig:
    model: str = field(default="default-base", metadata={
        "help": "teacher whose full-depth greedy answers become the training answers (the model you distill from)"})
    data_dir: str = field(default=DEFAULT_DATA_DIR, metadata={"help": "the shared data folder (train split only)"})
    output: str = field(default="runs/distill_data.jsonl", metadata={"help": "JSONL to write (appended; done ids skipped)"})
    num_prompts: int = field(default=2000, metadata={"help": "train-split prompts to answer, in the fixed hash order"})
    max_tokens: int = field(default=128, metadata={"help": "longest teacher answer, in tokens"})
    max_prompt_chars: int = field(default=EVAL_MAX_PROMPT_CHARS, metadata={
        "help": "skip longer prompts (long T0 documents cost prefill but add few scored tokens)"})
    chunk: int = field(default=64, metadata={"help": "prompts generated and appended together"})
    max_num_seqs: int = field(default=64, metadata={"help": "sequences the engine decodes together (raise on a GPU)"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + answer"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "where converted models are cached"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16"})

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_tokens", "max_prompt_chars", "chunk", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


def _done_ids(path: str) -> set[str]:
    if not os.path.exists(path):
        return set()
    with open(path, encoding="utf-8") as f:
        return {json.loads(line)["id"] for line in f if line.strip()}


def run_distill_data(config: DistillDataConfig) -> dict:
    """Generate the missing answers; returns counts and timing."""
    from adadepth.llm import LLM
    from adadepth.sampling_params import SamplingParams

    chosen = prompt_set(config.data_dir, Split.TRAIN, config.num_prompts, config.max_prompt_chars)
    done = _done_ids(config.output)
    todo = [e for e in chosen if e.id not in done]
    stats = {"output": config.output, "teacher": config.model, "prompts": len(chosen),
             "already_done": len(chosen) - len(todo), "generated": 0, "tokens": 0, "stopped": 0, "seconds": 0.0}
    if not todo:
        return stats
    llm = LLM(config.model, device=config.device, dtype=config.dtype, max_model_len=config.max_model_len,
              max_num_seqs=config.max_num_seqs, cache_dir=config.cache_dir)
    params = SamplingParams(max_tokens=config.max_tokens, temperature=0.0)
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    start = time.perf_counter()
    for i in range(0, len(todo), config.chunk):
        part = todo[i: i + config.chunk]
        outs = llm.chat([e.messages for e in part], params)
        with open(config.output, "a", encoding="utf-8") as f:
            for ex, out in zip(part, outs):
                completion = out.outputs[0]
                f.write(json.dumps({"messages": ex.messages, "completion": completion.text,
                                    "finish_reason": completion.finish_reason, "source": ex.source,
                                    "id": ex.id, "teacher": config.model}, ensure_ascii=False) + "\n")
                stats["tokens"] += len(completion.token_ids)
                stats["stopped"] += completion.finish_reason == "stop"
        stats["generated"] += len(part)
        stats["seconds"] = round(time.perf_counter() - start, 1)
        print(f"distill-data: {stats['already_done'] + stats['generated']}/{len(chosen)} prompts, "
              f"{stats['tokens'] / max(stats['seconds'], 1e-9):.0f} answer tok/s", flush=True)
    return stats
