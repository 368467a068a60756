"""`adadepth router eval`: the router against fixed depth on held-out prompts.

1. Label the held-out prompts at every grid depth of the router (same definition as training
   labels and `adadepth eval`; cached in --labels and resumed).
2. For each requested quality q: every prompt's routed depth, the mean depth, the realized
   agreement (pooled over positions at each prompt's routed depth), the mean predicted
   agreement, and the fixed-depth agreement interpolated at the same mean depth.
3. Timing: prompts prefilled one by one through the engine at quality `timing_quality`; the
   router's own time (pooling + predictor) against the prefill time and TTFT. These runs also
   check that the engine's routed depths equal the offline decisions.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from adadepth.config import ModelConfig, output_dir_for
from adadepth.router.difficulty_router import DifficultyRouter
from adadepth.router.feature_extractor import FeatureExtractor
from adadepth.router.label_store import LabelStore, StaleLabelsError, prompt_id
from adadepth.router.labeler import label_meta, label_prompts, open_llm, plan_dir_of
from adadepth.router.policy_sweep import (DEFAULT_QUALITIES, calibrated_split_half_oracle, fixed_depth_curve,
                                         oracle_sweep, sharpen, split_half_oracle, split_half_reliability,
                                         sweep_policy)
from adadepth.training.data import HELDOUT_PROMPTS_FILE

HELDOUT_LABELS_FILE = "router_heldout_labels.jsonl"
# The router's targets: gain over fixed depth at these qualities, calibration everywhere.
GAIN_TARGET, GAIN_QUALITIES, CALIBRATION_TARGET, ROUTER_TIME_TARGET = 0.03, (0.8, 0.9), 0.05, 0.01
# The spread counterfactual (`sharpened_router`): the router's predictions with their deviations
# from the mean doubled. Not a policy the server uses; it shows what spread alone does to the gain.
SHARPEN_FACTOR = 2.0


@dataclass
class RouterEvalConfig:
    prompts: str = field(default=HELDOUT_PROMPTS_FILE, metadata={"help": "held-out prompts JSONL"})
    labels: str = field(default="", metadata={
        "help": f"held-out labels JSONL, made when missing (default: {HELDOUT_LABELS_FILE} beside the model's layer order; for a model inside the installed package, a copy in the cache folder's outputs/)"})
    router: str = field(default="", metadata={"help": "folder with router.json (default: the model's own router)"})
    qualities: str = field(default=",".join(map(str, DEFAULT_QUALITIES)), metadata={"help": "qualities to sweep"})
    max_prompts: int = field(default=0, metadata={"help": "evaluate only N prompts, the first of each source in turn (0: all)"})
    max_new_tokens: int = field(default=64, metadata={"help": "full-depth greedy continuation length"})
    batch_size: int = field(default=16, metadata={"help": "sequences per teacher-forced pass"})
    chunk: int = field(default=32, metadata={"help": "prompts labelled (and saved) per round"})
    max_num_seqs: int = field(default=32, metadata={"help": "sequences generated together"})
    max_model_len: int = field(default=2048, metadata={"help": "longest prompt + continuation"})
    timing_prompts: int = field(default=50, metadata={"help": "prompts prefilled one by one for timing (0: none)"})
    timing_quality: float = field(default=0.9, metadata={"help": "quality of the timing runs"})
    json: str | None = field(default=None, metadata={"help": "write the report here"})
    plot: str | None = field(default=None, metadata={"help": "write the agreement-vs-mean-depth plot (PNG) here"})

    def __post_init__(self) -> None:
        self.quality_list  # validates
        for name in ("max_new_tokens", "batch_size", "chunk", "max_num_seqs", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_prompts < 0 or self.timing_prompts < 0:
            raise ValueError("max_prompts and timing_prompts must be >= 0")
        if not 0 < self.timing_quality <= 1:
            raise ValueError("timing_quality must be in (0, 1]")

    @property
    def quality_list(self) -> list[float]:
        try:
            qs = [float(q) for q in self.qualities.split(",") if q.strip()]
        except ValueError:
            raise ValueError(f"qualities must be comma-separated numbers, got {self.qualities!r}") from None
        if not qs or any(not 0 < q <= 1 for q in qs):
            raise ValueError(f"qualities must be in (0, 1], got {self.qualities!r}")
        return qs


def default_heldout_labels(model: ModelConfig) -> str:
    """The held-out labels file when the user names none: beside the layer order, or, for a model
    inside the installed package, in the cache, seeded with the shipped labels (still reused when
    they match the run's weights and settings; relabelled there, never in the package, when not)."""
    plan_dir = plan_dir_of(model)
    path = os.path.join(output_dir_for(plan_dir, model.cache_dir), HELDOUT_LABELS_FILE)
    shipped = os.path.join(plan_dir, HELDOUT_LABELS_FILE)
    if path != shipped and not os.path.exists(path) and os.path.exists(shipped):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(shipped, path)
    return path


def heldout_labels(llm, router: DifficultyRouter, messages: list[list[dict]], config: RouterEvalConfig, path: str,
                   model_name: str):
    store = LabelStore(path)
    meta = label_meta(llm, router.grid, config.max_new_tokens, model_name, config.prompts)
    try:
        done = {r.id: r for r in store.start(meta, resume=True)}
    except StaleLabelsError:  # labels of other weights or settings: a stale cache, relabel from scratch
        print(f"{path}: labelled with other weights or settings; relabelling", flush=True)
        done = {r.id: r for r in store.start(meta, resume=False)}
    todo = [m for m in messages if prompt_id(m) not in done]
    for start in range(0, len(todo), config.chunk):
        records = [r for r in label_prompts(llm, todo[start: start + config.chunk], router.grid,
                                            config.max_new_tokens, config.batch_size) if r is not None]
        store.append(records)
        done.update({r.id: r for r in records})
    return [done[prompt_id(m)] for m in messages if prompt_id(m) in done]


def fixed_depth_by_source(records: list, source_of: dict, grid) -> dict[str, list[dict]]:
    """{source: fixed-depth curve over that source's records}; prompts without a source are left out."""
    groups: dict[str, list] = {}
    for r in records:
        source = source_of.get(r.id)
        if source is not None:
            groups.setdefault(source, []).append(r)
    return {source: fixed_depth_curve(rs, grid) for source, rs in sorted(groups.items())}


def prediction_fit(predicted: torch.Tensor, records: list, grid) -> dict[str, dict]:
    """Per partial depth: how well the router's predicted agreement tracks each prompt's label
    (Pearson r and R^2 = 1 - SSE / SST over prompts), to set beside the labels' reliability."""
    out = {}
    for j, d in enumerate(grid.depths[:-1]):
        y = torch.tensor([r.agreement(d) for r in records], dtype=torch.float64)
        p = predicted[:, j].double()
        sst = float(((y - y.mean()) ** 2).sum())
        r = float(torch.corrcoef(torch.stack([p, y]))[0, 1]) if len(y) > 2 and p.std() > 0 and y.std() > 0 else float("nan")
        out[str(d)] = {"r": round(r, 4), "r2": round(1 - float(((y - p) ** 2).sum()) / sst, 4) if sst else None}
    return out


def time_routing(llm, router: DifficultyRouter, prompt_ids: list[list[int]], quality: float) -> dict:
    """Prefill each prompt alone (max_tokens=1) at `quality`: router time vs prefill and TTFT."""
    from adadepth.sampling_params import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=1, temperature=0.0, quality=quality)
    router_s, prefill_s, ttft_s, depths = [], [], [], []
    for i, ids in enumerate(prompt_ids):
        before = router.stats.seconds
        engine.add_request(f"router-timing-{i}", ids, params, arrival_time=time.monotonic())
        out = None
        while engine.has_unfinished_requests():
            for o in engine.step():
                out = o
        m = out.metrics
        router_s.append(router.stats.seconds - before)
        prefill_s.append(m.first_token_time - m.first_scheduled_time)
        ttft_s.append(m.first_token_time - m.arrival_time)
        depths.append(out.depth)
    n = len(prompt_ids)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "num_prompts": n, "quality": quality, "threads": torch.get_num_threads(),
        "mean_router_ms": round(1e3 * mean(router_s), 4), "mean_prefill_ms": round(1e3 * mean(prefill_s), 3),
        "mean_ttft_ms": round(1e3 * mean(ttft_s), 3),
        "router_share_of_ttft": round(sum(router_s) / sum(ttft_s), 6),
        "max_router_share_of_ttft": round(max(r / t for r, t in zip(router_s, ttft_s)), 6),
        "mean_prompt_tokens": round(mean([len(p) for p in prompt_ids]), 1),
        "_depths": depths,
    }


def run_router_eval(model: ModelConfig, config: RouterEvalConfig) -> dict:
    from adadepth.training.data import first_prompts, read_prompts_jsonl

    if model.num_threads:
        torch.set_num_threads(model.num_threads)
    router = None
    if config.router:
        from adadepth.model.loader import load_config, load_plan, resolve_model

        resolved = resolve_model(model.model, model.cache_dir)
        plan = load_plan(resolved.plan_dir, load_config(resolved.checkpoint_dir).num_hidden_layers)
        router = DifficultyRouter.load(config.router, plan)
    llm = open_llm(model, config.max_num_seqs, config.max_model_len, depth_router=router)
    router = llm.engine.depth_router
    if not isinstance(router, DifficultyRouter):
        raise FileNotFoundError(f"model {model.model!r} has no router (router.json beside its layer order); "
                                "train one with `adadepth router label` + `adadepth router train`, or pass --router")
    chosen = read_prompts_jsonl(config.prompts)
    if config.max_prompts:
        chosen = first_prompts(chosen, config.max_prompts)
    messages = [r.messages for r in chosen]
    source_of = {prompt_id(r.messages): r.source for r in chosen}
    labels_path = config.labels or default_heldout_labels(model)
    records = [r for r in heldout_labels(llm, router, messages, config, labels_path, model.model) if r.positions > 0]

    t0 = time.perf_counter()
    feats = FeatureExtractor(llm.engine.model, router.feature_layers, config.batch_size).extract(
        [r.prompt_token_ids for r in records])
    predicted = router.predict(feats)                                            # (n, len(grid))
    offline_s = time.perf_counter() - t0
    qualities = config.quality_list
    routed = sweep_policy(predicted, records, router.grid, qualities)
    sharpened = sharpen(predicted, SHARPEN_FACTOR)
    report = {
        "model": model.model, "num_layers": llm.num_layers, "layer_order": llm.engine.plan.layer_order,
        "plan_source": llm.engine.plan.source, "prompts": config.prompts, "labels": labels_path,
        "num_prompts": len(records), "continuation_tokens": config.max_new_tokens,
        "depth_grid": list(router.grid.depths), "feature_layers": router.feature_layers,
        "results": fixed_depth_curve(records, router.grid),
        # The prompts file mixes sources that skip layers very differently (GSM8K vs T0): per source,
        # so that a change that helps one and hurts another shows.
        "results_by_source": fixed_depth_by_source(records, source_of, router.grid),
        "router": routed,
        "oracle": oracle_sweep(records, router.grid, qualities),
        "prediction_fit": prediction_fit(predicted, records, router.grid),
        # Spread, not skill: the same predictions pushed apart (mean kept). It beats the interpolated
        # curve by more, a blind mix of two depths still beats it, and each prompt's prediction gets
        # worse (same r, lower R^2): a request no longer gets about the quality it asked for.
        "sharpened_router": {"factor": SHARPEN_FACTOR, "rows": sweep_policy(sharpened, records, router.grid, qualities),
                             "prediction_fit": prediction_fit(sharpened, records, router.grid)},
        "feature_extraction_s": round(offline_s, 2),
        "router_config": router.config_dict(),
    }
    if all(r.match_bits for r in records):
        # How much of a prompt's agreement is the prompt's at all, and what knowing it would gain.
        report["label_reliability"] = split_half_reliability(records, router.grid)
        report["split_half_oracle"] = split_half_oracle(records, router.grid, qualities)
        report["calibrated_split_half_oracle"] = calibrated_split_half_oracle(records, router.grid, qualities)
    if config.timing_prompts:
        timing_records = records[: config.timing_prompts]
        timing = time_routing(llm, router, [r.prompt_token_ids for r in timing_records], config.timing_quality)
        offline = [router.choose(row, config.timing_quality)[0] for row in predicted[: len(timing_records)].tolist()]
        engine_depths = timing.pop("_depths")
        timing["engine_matches_offline_decisions"] = sum(a == b for a, b in zip(engine_depths, offline))
        report["timing"] = timing
    report["targets"] = targets_met(report)
    if config.json:
        os.makedirs(os.path.dirname(os.path.abspath(config.json)), exist_ok=True)
        with open(config.json, "w") as f:
            json.dump(report, f, indent=1)
        # The curve the gateway answers `quality` with (copy it beside the model's layer order).
        from adadepth.server.depth_policy import DEPTH_CURVE_FILE, write_depth_curve

        write_depth_curve(report["results"], os.path.join(os.path.dirname(os.path.abspath(config.json)),
                                                          DEPTH_CURVE_FILE),
                          f"adadepth router eval on {report['num_prompts']} held-out prompts")
    if config.plot:
        from adadepth.router.router_eval_plot import plot_router_eval

        plot_router_eval(report, config.plot)
    return report


def targets_met(report: dict) -> dict:
    by_q = {r["quality"]: r for r in report["router"]}
    out = {
        f"gain_vs_fixed>={GAIN_TARGET}@q={q}": by_q[q]["gain_vs_fixed"] >= GAIN_TARGET
        for q in GAIN_QUALITIES if q in by_q}
    out[f"|calibration_error|<={CALIBRATION_TARGET} at every q"] = all(
        abs(r["calibration_error"]) <= CALIBRATION_TARGET for r in report["router"])
    if "timing" in report:
        out[f"router_time<={ROUTER_TIME_TARGET:.0%} of TTFT"] = report["timing"]["router_share_of_ttft"] <= ROUTER_TIME_TARGET
    return out
