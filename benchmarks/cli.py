"""`adadepth bench <kind>`: benchmarks, one module per kind, each with `add_parser(subparsers)`."""
from __future__ import annotations

import importlib

# Benchmarks that may be absent from a checkout (written separately); skipped quietly if so.
OPTIONAL_BENCHMARKS = ("adadepth.benchmarks.depth_bench", "adadepth.benchmarks.step_profile",
                       "adadepth.benchmarks.dtype_agreement", "adadepth.benchmarks.structured_bench",
                       "adadepth.benchmarks.soak", "adadepth.benchmarks.fuzz",
                       "adadepth.benchmarks.chunked_prefill_bench", "adadepth.benchmarks.load_sweep",
                       "adadepth.benchmarks.load_decisions", "adadepth.benchmarks.skinny_linear_bench",
                       "adadepth.benchmarks.chunk_attention_bench", "adadepth.benchmarks.matmul_rows_bench",
                       "adadepth.benchmarks.decode_attention_bench", "adadepth.benchmarks.gated_mlp_bench")


def add_parser(subparsers) -> None:
    from adadepth.benchmarks import serve_bench

    bench = subparsers.add_parser("bench", help="benchmarks (serve: HTTP latency/throughput)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    serve_bench.add_parser(bench_sub)
    for name in OPTIONAL_BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise
        module.add_parser(bench_sub)
