"""`adadepth router label`: agreement of every calibration prompt at every grid depth.

Exactly the definition `adadepth eval` uses (`adadepth.training.evaluate.score_prompts`): the
full-depth model greedily generates up to `max_new_tokens` tokens, the model at depth d is run
teacher-forced on prompt + continuation, and a position agrees when both argmaxes are equal.
The default prompts are the data's ``calib`` split, disjoint from the training and held-out
prompts; labels are written (and resumed) batch by batch (`LabelStore`).
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

from adadepth.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, output_dir_for
from adadepth.router.depth_grid import DepthGrid
from adadepth.router.label_store import LABEL_FORMAT, LabelRecord, LabelStore, prompt_id
from adadepth.training.data import DEFAULT_DATA_DIR

logger = logging.getLogger(__name__)

LABELS_FILE = "router_labels.jsonl"


@dataclass
class RouterLabelConfig:
    prompts: str = field(default="", metadata={
        "help": "JSONL of prompts ('messages' or 'prompt'); empty: the calib split of --data-dir"})
    data_dir: str = field(default=DEFAULT_DATA_DIR, metadata={"help": "shared data folder (for the calib split)"})
    count: int = field(default=400, metadata={"help": "label the first N prompts (0: all)"})
    depths: str = field(default="", metadata={
        "help": "depth grid, comma-separated (full depth is added); empty: 40%, 50%, ..., 100% of the layers"})
    max_new_tokens: int = field(default=64, metadata={"help": "full-depth greedy continuation length"})
    batch_size: int = field(default=16, metadata={"help": "sequences per teacher-forced pass"})
    chunk: int = field(default=32, metadata={"help": "prompts labelled (and saved) per round"})
    max_num_seqs: int = field(default=32, metadata={"help": "sequences generated together"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + continuation"})
    output: str = field(default="", metadata={"help": f"labels JSONL (default: {LABELS_FILE} in the model's plan folder; for a model inside the installed package, in the cache folder's outputs/)"})
    resume: bool = field(default=True, metadata={"help": "keep the labels already in --output (same settings)"})

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "batch_size", "chunk", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.count < 0:
            raise ValueError("count must be >= 0")


def open_llm(model: ModelConfig, max_num_seqs: int = 32, max_model_len: int = 2048, depth_router=None):
    """An `LLM` sized for scoring runs (as `adadepth eval` sizes it)."""
    from adadepth.llm import LLM

    cache = CacheConfig(num_kv_tokens=max(max_model_len, max_num_seqs * 768))
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                            max_num_batched_tokens=max(4096, max_model_len))
    return LLM(engine_config=EngineConfig(model, cache, sched), depth_router=depth_router)


def plan_dir_of(model: ModelConfig) -> str:
    from adadepth.model.loader import resolve_model

    return resolve_model(model.model, model.cache_dir).plan_dir


def load_prompt_messages(config: RouterLabelConfig) -> list[list[dict]]:
    from adadepth.training.data import calib_set, read_prompts_jsonl

    if config.prompts:
        messages = [r.messages for r in read_prompts_jsonl(config.prompts)]
    else:
        messages = [e.messages for e in calib_set(config.data_dir)]
    return messages[: config.count] if config.count else messages


def weights_fingerprint(model) -> str:
    """A short hash of the loaded weights (every parameter, sampled with a stride, at float16's
    resolution).

    Labels belong to one set of weights, not to a model *name*: "default" after a retrained
    adapter is another model, and resuming or training on its old labels would be silently wrong.
    Hashed as float16 values so that a float32 model has one fingerprint whether an engine rounds
    its weights to float16 (`weight_dtype`, as the labeller's engine may) or not (the trainer's model).
    """
    digest = hashlib.sha1()
    for name, p in sorted(model.named_parameters(), key=lambda item: item[0]):
        sample = p.detach().reshape(-1)[::4099].half().cpu().contiguous()  # prime stride: every row and column
        digest.update(name.encode("utf-8"))
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def label_meta(llm, grid: DepthGrid, max_new_tokens: int, model_name: str, prompts: str) -> dict:
    plan = llm.engine.plan
    return {"model": model_name, "weights_fingerprint": weights_fingerprint(llm.engine.model),
            "num_layers": llm.num_layers, "layer_order_fingerprint": plan.fingerprint(),
            "plan_source": plan.source, "depth_grid": list(grid.depths), "max_new_tokens": max_new_tokens,
            "prompts": prompts, "label_format": LABEL_FORMAT}


def label_prompts(llm, messages: list[list[dict]], grid: DepthGrid, max_new_tokens: int = 64,
                  batch_size: int = 16) -> list[LabelRecord | None]:
    """One record per prompt (None for a prompt too long for the model)."""
    from adadepth.training.chat_batches import encode_prompt
    from adadepth.training.evaluate import score_prompts

    scores = score_prompts(llm, messages, list(grid.depths), max_new_tokens=max_new_tokens,
                           batch_size=batch_size, exact_match=False)
    records: list[LabelRecord | None] = []
    for m, s in zip(messages, scores):
        if s is None:
            records.append(None)
            continue
        positions = s[grid.num_layers].positions
        records.append(LabelRecord(prompt_id(m), m, encode_prompt(llm.tokenizer, m), positions,
                                   {d: s[d].matches for d in grid.depths}, {d: s[d].match_bits for d in grid.depths}))
    return records


def run_labelling(model: ModelConfig, config: RouterLabelConfig) -> dict:
    llm = open_llm(model, config.max_num_seqs, config.max_model_len)
    grid = DepthGrid.parse(config.depths, llm.num_layers)
    output = config.output or os.path.join(output_dir_for(plan_dir_of(model), model.cache_dir), LABELS_FILE)
    messages = load_prompt_messages(config)
    source = config.prompts or f"calib split of {config.data_dir}"
    store = LabelStore(output)
    done = {r.id for r in store.start(label_meta(llm, grid, config.max_new_tokens, model.model, source), config.resume)}
    todo = [m for m in messages if prompt_id(m) not in done]
    t0 = time.perf_counter()
    labelled = skipped = 0
    for start in range(0, len(todo), config.chunk):
        records = label_prompts(llm, todo[start: start + config.chunk], grid, config.max_new_tokens, config.batch_size)
        store.append([r for r in records if r is not None])
        labelled += sum(r is not None for r in records)
        skipped += sum(r is None for r in records)
        logger.info("labelled %d/%d prompts (%.0fs)", len(done) + labelled, len(messages), time.perf_counter() - t0)
    return {"labels": output, "num_prompts": len(done) + labelled, "new": labelled, "skipped_too_long": skipped,
            "depth_grid": list(grid.depths), "seconds": round(time.perf_counter() - t0, 1)}
