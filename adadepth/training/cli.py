"""`adadepth train`, `calibrate`, `distill-data` and `eval`; flags come from the config dataclasses."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from adadepth.cli_args import add_dataclass_args, dataclass_from_args
from adadepth.config import ModelConfig
from adadepth.training.calibrate import CalibrateConfig
from adadepth.training.distill_data import DistillDataConfig
from adadepth.training.drop_schedule import DropConfig
from adadepth.training.evaluate import EvalConfig
from adadepth.training.losses import LossConfig
from adadepth.training.train_config import AdapterConfig, TrainConfig

TRAIN_CONFIGS = (TrainConfig, AdapterConfig, DropConfig, LossConfig)


def _train(args: argparse.Namespace) -> None:
    from adadepth.training.trainer import run_training

    meta = run_training(*(dataclass_from_args(cls, args) for cls in TRAIN_CONFIGS))
    summary = {k: meta[k] for k in ("steps", "tokens", "time_s", "tokens_per_s", "final_losses", "stopped_by", "hardware")}
    print(json.dumps({"artifact": args.output, **summary}))


def _calibrate(args: argparse.Namespace) -> None:
    from adadepth.training.calibrate import run_calibration

    config = dataclass_from_args(CalibrateConfig, args)
    result = run_calibration(config)
    print(json.dumps({
        "model": config.model, "layer_order": result.plan.layer_order, "source": result.plan.source,
        "bypass_layers": sorted(result.plan.bypass), "chosen": result.chosen,
        "serving_scores": result.candidate_scores, "metric": str(config.metric),
        "score_by_depth": {d: round(s, 5) for d, s in sorted(result.scores.items())},
        "seconds": round(result.seconds, 1)}))


def _distill_data(args: argparse.Namespace) -> None:
    from adadepth.training.distill_data import run_distill_data

    print(json.dumps(run_distill_data(dataclass_from_args(DistillDataConfig, args))))


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _eval(args: argparse.Namespace) -> None:
    from adadepth.training.evaluate import run_eval

    config = dataclass_from_args(EvalConfig, args)
    out = run_eval(args.model or [ModelConfig().model], config, command=shlex.join(["adadepth", *sys.argv[1:]]))
    for report in out.get("models", [out]):
        print(f"# {report['model']} ({report['num_layers']} layers, order: {report['plan_source']})")
        print(f"{'depth':>5} {'agree':>7} {'kl':>8} {'em32':>6} {'ppl':>8} {'n':>4}")
        for r in report["results"]:
            print(f"{r['depth']:>5} {_fmt(r['agreement'], '7.4f')} {_fmt(r['kl'], '8.4f')} "
                  f"{_fmt(r['exact_match_32'], '6.3f')} {_fmt(r['perplexity'], '8.3f')} {r['num_prompts']:>4}")
        for variant in report.get("free_running", []):
            name = ", ".join(f"{k}={v}" for k, v in variant["params"].items()) or "plain greedy"
            print(f"  free-running, {name}: depth ppl_full rep4 distinct2")
            for r in variant["results"]:
                print(f"  {r['depth']:>5} {_fmt(r['perplexity_full'], '8.3f')} {_fmt(r['repeated_4gram_share'], '6.3f')} "
                      f"{_fmt(r['distinct_2'], '6.3f')}")


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help="stochastic-depth fine-tuning (LoRA by default) into an artifact")
    for cls in TRAIN_CONFIGS:
        add_dataclass_args(train, cls)
    train.set_defaults(func=_train)

    calibrate = subparsers.add_parser("calibrate", help="measure the layer order (and bypass maps) on train prompts")
    add_dataclass_args(calibrate, CalibrateConfig)
    calibrate.set_defaults(func=_calibrate)

    distill = subparsers.add_parser("distill-data", help="the teacher's greedy answers to train prompts, "
                                                         "as a --train-file for sequence-level distillation")
    add_dataclass_args(distill, DistillDataConfig)
    distill.set_defaults(func=_distill_data)

    evaluate = subparsers.add_parser("eval", help="quality (agreement, KL, exact match, perplexity) versus depth")
    evaluate.add_argument("--model", action="append", default=None,
                          help="model or artifact; repeat to compare several (default: the engine's default model)")
    add_dataclass_args(evaluate, EvalConfig)
    evaluate.set_defaults(func=_eval)
