"""`adadepth export --model M --depth d OUT`: flags from ExportConfig."""
from __future__ import annotations

import argparse
import json

from adadepth.cli_args import add_dataclass_args, dataclass_from_args
from adadepth.export import ExportConfig


def _export(args: argparse.Namespace) -> None:
    from adadepth.export import export_depth

    result = export_depth(dataclass_from_args(ExportConfig, args), args.output)
    print(json.dumps({"output": result.output_dir, "model": result.source_model, "depth": result.depth,
                      "num_layers": result.num_layers, "kept_layers": result.kept_layers,
                      "exact": result.bypass.exact, "bypass_folded": result.bypass.folded,
                      "bypass_dropped": result.bypass.dropped}))


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write the depth-d model as a plain Hugging Face checkpoint (for vLLM depth tiers)",
        description="Writes the d layers a depth-d request runs (artifact weights merged, renumbered 0..d-1) as a "
                    "standard checkpoint folder that transformers and vLLM load. Bypass maps are folded where that "
                    "is exact; otherwise the export is refused unless --drop-bypass is given.")
    add_dataclass_args(parser, ExportConfig)
    parser.add_argument("output", help="folder to create (must not exist, or be empty)")
    parser.set_defaults(func=_export)
