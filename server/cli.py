"""`adadepth serve`: the OpenAI-compatible HTTP server."""
from __future__ import annotations

import argparse

from adadepth.cli_args import add_dataclass_args, dataclass_from_args
from adadepth.server.config import ServerConfig


def _serve(args: argparse.Namespace) -> None:
    from adadepth.cli import engine_config_from_args

    config = dataclass_from_args(ServerConfig, args)
    if config.backend_map is not None:  # a gateway: config, tokenizer and layer order only, no weights
        from adadepth.server.gateway import run_gateway

        run_gateway(engine_config_from_args(args), config)
        return
    from adadepth.server.api_server import run_server

    run_server(engine_config_from_args(args), config)


def add_parser(subparsers) -> None:
    from adadepth.cli import add_engine_args

    parser = subparsers.add_parser(
        "serve", help="serve the model over an OpenAI-compatible HTTP API",
        description="OpenAI-compatible server: /v1/completions, /v1/chat/completions, /v1/models, /health, "
                    "/metrics, /tokenize, /detokenize. Requests may set 'depth' (layers, or a fraction in "
                    "(0, 1]) or 'quality'. With --backend-map it is a gateway instead: each request is proxied to the "
                    "vLLM (or other OpenAI) server of the shallowest depth tier at or above its depth.")
    add_engine_args(parser)
    add_dataclass_args(parser, ServerConfig)
    parser.set_defaults(func=_serve)
