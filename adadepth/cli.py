"""`adadepth` command line: generate, serve, bench, train, calibrate, eval, export.

Each subcommand's flags are built from its config dataclasses (see `adadepth.cli_args`).
Subcommands live in their own modules and register themselves through `add_parser(subparsers)`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from adadepth.cli_args import add_dataclass_args, dataclass_from_args
from adadepth.config import CacheConfig, DepthPolicyConfig, EngineConfig, ModelConfig, SchedulerConfig

# Modules that provide `add_parser(subparsers)`; each sets `func` on its parser. Optional ones
# (not yet written, or missing extras) are skipped quietly so the others still work.
SUBCOMMAND_MODULES = (
    "adadepth.server.cli",
    "adadepth.benchmarks.cli",
    "adadepth.training.cli",
    "adadepth.router.cli",
    "adadepth.export_cli",
)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    for cls in (ModelConfig, CacheConfig, SchedulerConfig, DepthPolicyConfig):
        add_dataclass_args(parser, cls)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(dataclass_from_args(ModelConfig, args), dataclass_from_args(CacheConfig, args),
                        dataclass_from_args(SchedulerConfig, args), dataclass_from_args(DepthPolicyConfig, args))


def _generate(args: argparse.Namespace) -> None:
    from adadepth import LLM, SamplingParams

    llm = LLM(engine_config=engine_config_from_args(args))
    depth = None if args.depth is None else (float(args.depth) if "." in args.depth else int(args.depth))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, depth=depth, quality=args.quality)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        print(json.dumps({"prompt": prompt, "text": out.text, "depth": out.depth,
                          "num_layers": llm.num_layers, "finish_reason": out.outputs[0].finish_reason}))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adadepth", description="adaptive-depth LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions for prompts (args or stdin lines)")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="*", help="prompts; read from stdin, one per line, when absent")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--depth", default=None, help="layers (int) or fraction of layers (float in (0, 1])")
    gen.add_argument("--quality", type=float, default=None, help="target agreement; the router picks depth")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    gen.set_defaults(func=_generate)
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A subcommand whose dependencies this install lacks (e.g. a GPU box without fastapi)
            # is left out; the others still work.
            print(f"adadepth: {name.rsplit('.', 1)[0]} commands unavailable: {exc}", file=sys.stderr)
            continue
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        sys.exit(f"adadepth {args.command}: error: {exc}")


if __name__ == "__main__":
    main()
