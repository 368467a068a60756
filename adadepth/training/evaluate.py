"""`adadepth eval`: quality versus depth, measured against the same model at full depth.

For each prompt the full-depth model greedily generates up to `max_new_tokens` tokens (engine,
`LLM.generate`). The engine's own model is then run teacher-forced on prompt + continuation at
every depth (`SequenceForward`, i.e. `AdaptiveLlama.forward` with the model's layer order and
bypass maps), and at each continuation position:

  * agreement: depth-d argmax == full-depth argmax (pooled over all positions of all prompts);
  * kl: KL(full || depth d) of the next-token distributions (pooled mean);
  * perplexity: exp(mean NLL) of the reference answer, when the prompt file has one;
  * exact_match_32: share of prompts whose depth-d greedy continuation (engine, 32 tokens)
    equals the full-depth one over those tokens;
  * free-running quality of depth-d's own greedy text (`free_running.py`): the full-depth
    model's perplexity of it and how much it repeats itself, plain and with penalties.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch

from adadepth.config import _default_cache_dir
from adadepth.training.chat_batches import encode_chat, encode_prompt
from adadepth.training.data import HELDOUT_PROMPTS_FILE, PromptRecord, first_prompts, read_prompts_jsonl
from adadepth.training.depth_scorer import DepthScore, DepthScorer


@dataclass
class EvalConfig:
    prompts: str = field(default=HELDOUT_PROMPTS_FILE, metadata={
        "help": "JSONL with 'prompt' or 'messages', optional 'completion'/'answer' (default: the held-out split)"})
    depths: str = field(default="15,18,21,24,27,30", metadata={"help": "comma-separated depths to evaluate"})
    max_prompts: int = field(default=0, metadata={"help": "evaluate only N prompts, the first of each source in turn (0: all)"})
    max_new_tokens: int = field(default=64, metadata={"help": "full-depth greedy continuation length"})
    exact_match_tokens: int = field(default=32, metadata={"help": "tokens compared for exact_match"})
    exact_match: bool = field(default=True, metadata={
        "help": "measure exact_match_32 (a greedy generation per depth: the slowest part of a CPU run)"})
    max_reference_tokens: int = field(default=128, metadata={"help": "reference answer tokens scored for perplexity"})
    perplexity: bool = field(default=True, metadata={"help": "score reference answers when present"})
    compare: bool = field(default=False, metadata={"help": "also evaluate each artifact's base model"})
    batch_size: int = field(default=16, metadata={"help": "sequences per teacher-forced pass"})
    max_num_seqs: int = field(default=32, metadata={"help": "sequences generated together by the engine"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + continuation"})
    json: str | None = field(default=None, metadata={"help": "write results as JSON here"})
    free_running: bool = field(default=True, metadata={
        "help": "score each depth's own greedy text (full-depth perplexity, repeated 4-grams, distinct-2)"})
    free_running_tokens: int = field(default=64, metadata={"help": "tokens of each depth's own continuation"})
    free_running_variants: str = field(default="", metadata={
        "help": "also generate with these penalties, ';'-separated groups of name=value (e.g. "
                "'repetition_penalty=1.1;frequency_penalty=0.5'); plain greedy is always measured"})
    plot: str | None = field(default=None, metadata={"help": "write an agreement/KL-vs-depth plot (PNG) here"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "where converted models are cached"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 keeps torch's default"})

    def __post_init__(self) -> None:
        self.depth_list  # validates
        self.variants  # validates
        for name in ("max_new_tokens", "exact_match_tokens", "batch_size", "max_num_seqs", "max_reference_tokens",
                     "free_running_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prompts < 0:
            raise ValueError("max_prompts must be >= 0")

    @property
    def variants(self) -> list[dict[str, float]]:
        from adadepth.training.free_running import parse_variants

        return parse_variants(self.free_running_variants) if self.free_running else []

    @property
    def depth_list(self) -> list[int]:
        try:
            depths = sorted({int(d) for d in self.depths.split(",") if d.strip()})
        except ValueError:
            raise ValueError(f"depths must be comma-separated integers, got {self.depths!r}") from None
        if not depths or depths[0] < 1:
            raise ValueError(f"depths must be >= 1, got {self.depths!r}")
        return depths


def _messages(prompt) -> list[dict]:
    if isinstance(prompt, PromptRecord):
        return prompt.messages
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def score_prompts(llm, prompts: list, depths: list[int], *, max_new_tokens: int = 64, exact_match_tokens: int = 32,
                  references: list[str | None] | None = None, max_reference_tokens: int = 128,
                  batch_size: int = 16, exact_match: bool = True,
                  free_running_tokens: int = 0) -> list[dict[int, DepthScore] | None]:
    """Per prompt, per depth: the raw counts behind every metric. None for prompts too long to run.
    free_running_tokens > 0: each DepthScore also keeps depth-d's own greedy continuation of that
    many tokens (`continuation`), from the same generation as the exact match.

    prompts: user-message strings, message lists, or `PromptRecord`s.
    """
    from adadepth.sampling_params import SamplingParams

    tokenizer, n_layers = llm.tokenizer, llm.num_layers
    messages = [_messages(p) for p in prompts]
    prompt_ids = [encode_prompt(tokenizer, m) for m in messages]
    fits = [len(ids) + max_new_tokens <= llm.engine.max_model_len for ids in prompt_ids]
    run = [i for i, ok in enumerate(fits) if ok]
    scores: list[dict[int, DepthScore] | None] = [
        {d: DepthScore() for d in depths} if ok else None for ok in fits]
    if not run:
        return scores
    full_params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, depth=n_layers)
    outs = llm.generate([prompt_ids[i] for i in run], full_params)
    continuation = {i: list(o.token_ids) for i, o in zip(run, outs)}
    scorer = DepthScorer(llm, depths, batch_size)
    scorer.agreement_and_kl(scores, [(i, prompt_ids[i] + continuation[i], len(prompt_ids[i])) for i in run])
    if references is not None:
        items = []
        for i in run:
            if references[i]:
                chat = encode_chat(tokenizer, messages[i], references[i])
                end = min(len(chat.input_ids), chat.num_prompt_tokens + max_reference_tokens, llm.engine.max_model_len)
                if end > chat.num_prompt_tokens:
                    items.append((i, chat.input_ids[:end], chat.num_prompt_tokens))
        scorer.reference_nll(scores, items)
    if exact_match or free_running_tokens:
        tokens = max(exact_match_tokens if exact_match else 0, free_running_tokens)
        for depth in depths:
            if depth == n_layers and tokens <= max_new_tokens:  # the same greedy run
                own = {i: continuation[i][:tokens] for i in run}
            else:
                params = SamplingParams(max_tokens=tokens, temperature=0.0, depth=depth)
                own = {i: list(o.token_ids) for i, o in zip(run, llm.generate([prompt_ids[i] for i in run], params))}
            for i in run:
                if exact_match:
                    ref = continuation[i][:exact_match_tokens]
                    scores[i][depth].exact_match = own[i][: len(ref)] == ref
                if free_running_tokens:
                    scores[i][depth].continuation = own[i][:free_running_tokens]
    return scores


def per_prompt_agreement(llm, prompts: list, depths: list[int], max_new_tokens: int = 64,
                         batch_size: int = 16) -> list[dict[int, float] | None]:
    """For each prompt: {depth: share of its full-depth continuation's positions where the
    depth-d argmax equals the full-depth argmax}. None for a prompt too long for the model.

    prompts: user-message strings (wrapped in the chat template) or chat message lists.
    """
    scores = score_prompts(llm, prompts, depths, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           exact_match=False)
    return [None if s is None else {d: s[d].agreement for d in depths} for s in scores]


def aggregate(scores: list[dict[int, DepthScore] | None], depths: list[int]) -> list[dict]:
    results = []
    for depth in depths:
        rows = [s[depth] for s in scores if s is not None]
        positions = sum(r.positions for r in rows)
        ref_tokens = sum(r.ref_tokens for r in rows)
        ems = [r.exact_match for r in rows if r.exact_match is not None]
        results.append({
            "depth": depth,
            "agreement": round(sum(r.matches for r in rows) / positions, 5) if positions else None,
            "kl": round(sum(r.kl_sum for r in rows) / positions, 5) if positions else None,
            "exact_match_32": round(sum(ems) / len(ems), 5) if ems else None,
            "perplexity": round(math.exp(sum(r.nll_sum for r in rows) / ref_tokens), 4) if ref_tokens else None,
            "num_prompts": len(rows),
            "num_positions": positions,
        })
    return results


def base_of(model: str) -> str | None:
    """The base model an artifact folder names, or None for a plain model."""
    from adadepth.model.loader import ARTIFACT_FILE, DEFAULT_ARTIFACT_DIR

    folder = DEFAULT_ARTIFACT_DIR if model == "default" else model
    meta = os.path.join(folder, ARTIFACT_FILE)
    if not os.path.exists(meta):
        return None
    with open(meta) as f:
        base = json.load(f)["base_model"]
    return base if os.path.isabs(base) or base.startswith("default") else os.path.join(folder, base)


def evaluate_model(model: str, records: list[PromptRecord], config: EvalConfig) -> dict:
    llm = _open_llm(model, config)
    depths = config.depth_list
    references = [r.reference for r in records] if config.perplexity else None
    scores = score_prompts(llm, records, depths, max_new_tokens=config.max_new_tokens,
                           exact_match_tokens=config.exact_match_tokens, references=references,
                           max_reference_tokens=config.max_reference_tokens, batch_size=config.batch_size,
                           exact_match=config.exact_match,
                           free_running_tokens=config.free_running_tokens if config.free_running else 0)
    plan = llm.engine.plan
    free_running = free_running_report(llm, records, scores, depths, config) if config.free_running else None
    return {
        "model": model, "num_layers": llm.num_layers, "layer_order": plan.layer_order, "plan_source": plan.source,
        "has_bypass": bool(plan.bypass), "prompts": config.prompts,
        "num_skipped_prompts": sum(s is None for s in scores),
        "metric_notes": {"exact_match_32": f"first {config.exact_match_tokens} tokens",
                         "continuation_tokens": config.max_new_tokens},
        "results": aggregate(scores, depths),
        **({"free_running": free_running} if free_running is not None else {}),
    }


def free_running_report(llm, records: list[PromptRecord], scores: list[dict[int, DepthScore] | None],
                        depths: list[int], config: EvalConfig) -> list[dict]:
    """One entry per variant (plain greedy first): its parameters and per-depth free-running scores."""
    from adadepth.training.free_running import generate_at_depths, score_continuations

    run = [i for i, s in enumerate(scores) if s is not None]
    prompt_ids = {i: encode_prompt(llm.tokenizer, _messages(records[i])) for i in run}
    report = []
    for variant in config.variants:
        if variant:
            texts = generate_at_depths(llm, prompt_ids, depths, config.free_running_tokens, variant)
        else:  # plain greedy: the continuations score_prompts already generated
            texts = {d: {i: scores[i][d].continuation for i in run} for d in depths}
        pooled = score_continuations(llm, prompt_ids, texts, config.batch_size)
        report.append({"params": variant, "tokens": config.free_running_tokens,
                       "results": [pooled[d].summary(d) for d in depths]})
    return report


def _open_llm(model: str, config: EvalConfig):
    from adadepth.llm import LLM

    return LLM(model, device=config.device, dtype=config.dtype, max_model_len=config.max_model_len,
               max_num_seqs=config.max_num_seqs, max_num_batched_tokens=max(4096, config.max_model_len),
               num_kv_tokens=max(config.max_model_len, config.max_num_seqs * 768))


def full_depth_fidelity(model: str, base: str, records: list[PromptRecord], config: EvalConfig) -> dict:
    """How much training changed the full-depth model: `base` greedily continues each prompt
    (up to max_new_tokens), then `model` is run teacher-forced on prompt + that continuation;
    agreement is the share of positions where its argmax is the base's token. At full depth that
    is the fidelity target; at every evaluated depth (`by_depth`) it separates what a reduced
    depth shares with the trained full depth from what it still gets right about the base."""
    from adadepth.sampling_params import SamplingParams

    base_llm = _open_llm(base, config)
    prompt_ids = [encode_prompt(base_llm.tokenizer, _messages(r)) for r in records]
    run = [i for i, ids in enumerate(prompt_ids) if len(ids) + config.max_new_tokens <= base_llm.engine.max_model_len]
    params = SamplingParams(max_tokens=config.max_new_tokens, temperature=0.0)
    outs = base_llm.generate([prompt_ids[i] for i in run], params)
    items = [(i, prompt_ids[i] + list(o.token_ids), len(prompt_ids[i])) for i, o in zip(run, outs) if o.token_ids]
    del base_llm
    llm = _open_llm(model, config)
    depths = sorted(set(config.depth_list) | {llm.num_layers})
    scorer = DepthScorer(llm, depths, config.batch_size)
    by_depth = {}
    for depth in depths:
        matches, positions = scorer.next_token_matches(items, depth)
        by_depth[str(depth)] = round(matches / positions, 5) if positions else None
    return {"base": base, "agreement_with_base_greedy": by_depth[str(llm.num_layers)], "by_depth": by_depth,
            "positions": positions, "num_prompts": len(items)}


def run_eval(models: list[str], config: EvalConfig, command: str | None = None) -> dict:
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    records = read_prompts_jsonl(config.prompts)
    if config.max_prompts:
        records = first_prompts(records, config.max_prompts)
    names = list(models)
    if config.compare:
        for m in models:
            base = base_of(m)
            if base is not None and base not in names:
                names.append(base)
    reports = [evaluate_model(m, records, config) for m in names]
    if config.compare:
        # Full depth must stay what the base model was: agreement with the base's own greedy text.
        for report in reports:
            base = base_of(report["model"])
            if base is not None:
                report["full_depth_vs_base"] = full_depth_fidelity(report["model"], base, records, config)
    # One model: the plain report. Several: the first one's fields stay at the top level (tools
    # reading a single report still work) and "models" lists all of them.
    out = dict(reports[0]) if len(reports) == 1 else {**reports[0], "models": reports}
    from adadepth.benchmarks.machine import machine_info

    out["machine"] = machine_info()
    if command:
        out["command"] = command
    if config.json:
        os.makedirs(os.path.dirname(os.path.abspath(config.json)), exist_ok=True)
        with open(config.json, "w") as f:
            json.dump(out, f, indent=1)
    if config.plot:
        from adadepth.training.eval_plot import plot_reports

        plot_reports(reports, config.plot)
    return out
