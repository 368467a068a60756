"""`adadepth bench fuzz`: schemathesis against a live server's own OpenAPI schema.

For every operation in the schema, schemathesis generates request bodies (half valid by the
schema, half not) and sends them; each response must pass schemathesis' checks (no 5xx, a status
code and content type the schema declares, a body that conforms to the schema: for every 4xx,
OpenAI's error body). After the run the server must still be healthy. Loopback only, bounded by
the number of examples.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FuzzConfig:
    model: str = field(default="default", metadata={"help": "model the started server serves"})
    url: str = field(default="", metadata={"help": "fuzz a server already running here instead (loopback)"})
    server_args: str = field(default="", metadata={"help": "extra `adadepth serve` flags for the started server"})
    examples: int = field(default=100, metadata={"help": "examples per operation and generation mode"})
    seed: int = field(default=0, metadata={"help": "hypothesis seed"})
    out: str = field(default="benchmarks/results/fuzz.json", metadata={"help": "JSON output"})

    def __post_init__(self) -> None:
        from adadepth.benchmarks.soak import require_loopback

        require_loopback(self.url, "fuzzing")
        if self.examples < 1:
            raise ValueError("examples must be >= 1")


def fuzz(base_url: str, examples: int, seed: int = 0) -> dict:
    """{operation: {mode: {"requests", "statuses", "failures"}}} plus totals; never raises on a
    failing check: failures are counted and described."""
    import httpx
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, seed as hypothesis_seed, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    from schemathesis import checks as st_checks

    # No 5xx; only the status codes and content types the schema declares; bodies that conform to it
    # (for every 4xx, OpenAI's error body); invalid input refused. Not checked: that every request
    # valid by the schema is accepted (the schema cannot state limits such as the context length).
    CHECKS = [st_checks.not_a_server_error, st_checks.status_code_conformance, st_checks.content_type_conformance,
              st_checks.response_schema_conformance, st_checks.negative_data_rejection]
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    report: dict = {}
    for result in schema.get_all_operations():
        operation = result.ok()
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            stats: dict = {"requests": 0, "statuses": {}, "failures": []}

            @hypothesis_seed(seed)
            @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def send(case) -> None:
                response = case.call(base_url=base_url, timeout=120)
                stats["requests"] += 1
                code = str(response.status_code)
                stats["statuses"][code] = stats["statuses"].get(code, 0) + 1
                try:
                    case.validate_response(response, checks=CHECKS)
                except (Exception, BaseExceptionGroup) as exc:  # noqa: BLE001 - a failed check: record it, go on
                    if len(stats["failures"]) < 10:
                        stats["failures"].append({"status": response.status_code, "check": str(exc)[:500],
                                                  "body": (case.body if isinstance(case.body, (dict, list, str))
                                                           else repr(case.body))})
                    stats["failed"] = stats.get("failed", 0) + 1

            try:
                send()
            except Unsatisfiable:  # nothing to make invalid (a GET without parameters)
                stats["note"] = "no invalid request can be generated for this operation"
            report.setdefault(label, {})[mode.value] = dict(stats)
    healthy = httpx.get(base_url + "/health", timeout=30).status_code == 200
    totals = {"requests": 0, "server_errors": 0, "failed_checks": 0, "statuses": {}}
    for modes in report.values():
        for stats in modes.values():
            totals["requests"] += stats["requests"]
            totals["failed_checks"] += stats.get("failed", 0)
            for code, count in stats["statuses"].items():
                totals["statuses"][code] = totals["statuses"].get(code, 0) + count
                if code.startswith("5"):
                    totals["server_errors"] += count
    return {"operations": report, "totals": totals, "healthy_after": healthy}


def run(cfg: FuzzConfig) -> dict:
    from adadepth.benchmarks.machine import machine_info
    from adadepth.benchmarks.soak import SoakConfig, start_server

    proc = None
    if cfg.url:
        url = cfg.url.rstrip("/")
    else:
        proc, url = start_server(SoakConfig(model=cfg.model, server_args=cfg.server_args))
    t0 = time.perf_counter()
    try:
        result = fuzz(url, cfg.examples, cfg.seed)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(120)
    import schemathesis

    machine = machine_info()
    report = {"benchmark": "fuzz", "date": machine["date"], "commit": machine["commit"], "machine": machine,
              "tool": f"schemathesis {schemathesis.__version__}", "config": dataclasses.asdict(cfg),
              "seconds": round(time.perf_counter() - t0, 1), **result}
    out = Path(cfg.out) if Path(cfg.out).is_absolute() else REPO_ROOT / cfg.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    t = report["totals"]
    print(f"{t['requests']} requests: statuses {t['statuses']}; 5xx {t['server_errors']}; failed checks "
          f"{t['failed_checks']}; healthy after: {report['healthy_after']}\nwrote {out}")
    return report


def _run_checked(cfg) -> None:
    """run(cfg), exiting 1 when the run found a failure."""
    import sys

    report = run(cfg)
    if report["totals"]["server_errors"] or report["totals"]["failed_checks"] or not report["healthy_after"]:
        sys.exit(1)


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "fuzz", FuzzConfig, _run_checked,
                       help="schemathesis against the live server's OpenAPI schema")
