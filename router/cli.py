"""`adadepth router label|train|eval`: make the difficulty router's labels, train it, evaluate it.

    adadepth router label --model default            # calib split -> router_labels.jsonl
    adadepth router train --model default            # -> router.json + router.safetensors
    adadepth router eval  --model default --json r.json --plot r.png   # held-out prompts
"""
from __future__ import annotations

import argparse
import json
import logging

from adadepth.cli_args import add_dataclass_args, dataclass_from_args
from adadepth.config import ModelConfig
from adadepth.router.labeler import RouterLabelConfig
from adadepth.router.router_eval import RouterEvalConfig
from adadepth.router.router_trainer import RouterTrainConfig


def _label(args: argparse.Namespace) -> None:
    _log()
    from adadepth.router.labeler import run_labelling

    print(json.dumps(run_labelling(dataclass_from_args(ModelConfig, args), dataclass_from_args(RouterLabelConfig, args))))


def _train(args: argparse.Namespace) -> None:
    _log()
    from adadepth.router.router_trainer import train_router

    print(json.dumps(train_router(dataclass_from_args(ModelConfig, args), dataclass_from_args(RouterTrainConfig, args))))


def _eval(args: argparse.Namespace) -> None:
    _log()
    from adadepth.router.router_eval import run_router_eval

    report = run_router_eval(dataclass_from_args(ModelConfig, args), dataclass_from_args(RouterEvalConfig, args))
    print(f"# {report['model']}: {report['num_prompts']} held-out prompts, grid {report['depth_grid']}, "
          f"k={report['feature_layers']}")
    print("fixed depth: " + "  ".join(f"{r['depth']}:{r['agreement']:.4f}" for r in report["results"]))
    print(f"{'q':>5} {'depth':>6} {'agree':>7} {'pred':>7} {'fixed@d':>8} {'gain':>7} {'mix@d':>7} {'gain':>7}")
    for r in report["router"]:
        print(f"{r['quality']:>5g} {r['mean_depth']:>6.2f} {r['agreement']:>7.4f} {r['predicted_agreement']:>7.4f} "
              f"{r['fixed_depth_agreement_at_mean_depth']:>8.4f} {r['gain_vs_fixed']:>+7.4f} "
              f"{r['mixed_fixed_depths_agreement_at_mean_depth']:>7.4f} {r['gain_vs_mixed_fixed_depths']:>+7.4f}")
    if "timing" in report:
        t = report["timing"]
        print(f"router {t['mean_router_ms']:.3f} ms vs TTFT {t['mean_ttft_ms']:.1f} ms "
              f"({100 * t['router_share_of_ttft']:.3f} %)")
    print(json.dumps(report["targets"]))


def add_parser(subparsers) -> None:
    router = subparsers.add_parser("router", help="learned difficulty router: label, train, eval")
    sub = router.add_subparsers(dest="router_command", required=True)
    for name, cls, func, text in (
            ("label", RouterLabelConfig, _label, "agreement of calibration prompts at every grid depth"),
            ("train", RouterTrainConfig, _train, "train the router on labels; saved beside the model's layer order"),
            ("eval", RouterEvalConfig, _eval, "router vs fixed depth on held-out prompts")):
        parser = sub.add_parser(name, help=text, description=text)
        add_dataclass_args(parser, ModelConfig)
        add_dataclass_args(parser, cls)
        # Labels are quality measurements, made in float32 like `adadepth eval`'s; the labels' weights
        # fingerprint is taken in the run's dtype, so a bf16 run would not reuse float32 labels.
        parser.set_defaults(func=func, dtype="float32")


def _log() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
