"""`adadepth bench serve`: latency and throughput of a running OpenAI-compatible server.

Sends the same chat requests at each concurrency level (closed loop), or at each request rate
(`--request-rate`: Poisson arrivals, seeded, as `vllm bench serve --request-rate`), streaming,
with a fixed output length (ignore_eos), and reports what vLLM's serving benchmark reports: TTFT,
TPOT, ITL and end-to-end latency percentiles, output tokens per second, and goodput (requests per
second that met `--slo-ttft-ms` and `--slo-tpot-ms`); each level can be repeated (median, min and
max). The default prompts ship with the repository: the held-out split (GSM8K, T0 and Alpaca
prompts never trained on), taken one source after another. Works against vLLM as well as
adadepth (the depth fields are simply ignored there).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PERCENTILES = (50, 90, 99)


@dataclass
class ServeBenchConfig:
    base_url: str = field(default="http://127.0.0.1:8000", metadata={"help": "server address (without /v1)"})
    model: str = field(default="default", metadata={"help": "model name sent in requests"})
    concurrency: str = field(default="1,4,16", metadata={
        "help": "comma-separated concurrency levels (closed loop); with --request-rate, one number: the most "
                "requests in flight (0: no bound)"})
    request_rate: str | None = field(default=None, metadata={
        "help": "comma-separated request rates (per second): requests arrive as a Poisson process at each "
                "rate instead of a closed loop"})
    seed: int = field(default=0, metadata={"help": "seed of the Poisson arrivals"})
    slo_ttft_ms: float | None = field(default=None, metadata={
        "help": "goodput: a request counts if its time to first token is at most this"})
    slo_tpot_ms: float | None = field(default=None, metadata={
        "help": "goodput: ... and its time per output token after the first at most this"})
    num_requests: int = field(default=0, metadata={
        "help": "requests per concurrency level; 0: twice the concurrency, at least 8"})
    repeats: int = field(default=1, metadata={"help": "runs of each level (median, min and max reported)"})
    max_tokens: int = field(default=128, metadata={"help": "output tokens per request (EOS ignored)"})
    depth: str | None = field(default=None, metadata={
        "help": "adadepth depth: layers (int) or fraction of layers (float in (0, 1]); none: server default"})
    quality: float | None = field(default=None, metadata={"help": "adadepth quality target instead of a depth"})
    temperature: float = field(default=0.0, metadata={"help": "sampling temperature"})
    label: str = field(default="default", metadata={"help": "name of this run, used in the output file name"})
    out: str | None = field(default=None, metadata={"help": "JSON output (default: benchmarks/results/serve_<label>.json)"})
    data: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": ("prompts jsonl (lines with 'messages' or 'prompt', mixed over their 'source'; or GSM8K lines "
                 "with 'question', the last ones taken); a relative path is taken from the repository root")})
    warmup: int = field(default=1, metadata={"help": "requests sent (and not measured) before the first level"})
    api_key: str | None = field(default=None, metadata={"help": "bearer token (default: $ADADEPTH_API_KEY)"})
    timeout_s: float = field(default=600.0, metadata={"help": "per-request timeout in seconds"})

    def __post_init__(self) -> None:
        self.rates = [float(r) for r in (self.request_rate or "").split(",") if r.strip()]
        if any(not r > 0 for r in self.rates):
            raise ValueError(f"request rates must be > 0, got {self.request_rate!r}")
        self.levels = [int(c) for c in self.concurrency.split(",") if c.strip()]
        if self.rates:
            if len(self.levels) != 1 or self.levels[0] < 0:
                raise ValueError("with --request-rate, --concurrency is one number >= 0 (the most requests in flight)")
        elif not self.levels or any(c < 1 for c in self.levels):
            raise ValueError(f"concurrency must be comma-separated integers >= 1, got {self.concurrency!r}")
        if self.num_requests < 0 or self.max_tokens < 1 or self.warmup < 0 or self.repeats < 1:
            raise ValueError("num_requests must be >= 0, max_tokens and repeats >= 1, warmup >= 0")
        self.depth_value = None if self.depth is None else (float(self.depth) if "." in self.depth else int(self.depth))
        if self.out is None:
            self.out = str(REPO_ROOT / "benchmarks" / "results" / f"serve_{self.label}.json")
        if self.api_key is None:
            self.api_key = os.environ.get("ADADEPTH_API_KEY") or None

    def requests_at(self, concurrency: int) -> int:
        return self.num_requests or max(8, 2 * concurrency)

    def requests_at_rate(self, rate: float) -> int:
        """Poisson runs: --num-requests, or 30 s worth of arrivals (at least 16)."""
        return self.num_requests or max(16, round(30 * rate))

    def data_path(self) -> Path:
        path = Path(self.data)
        return path if path.is_absolute() else REPO_ROOT / path


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft: float = 0.0           # seconds to the first content chunk
    latency: float = 0.0        # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    output_tokens: int = 0
    prompt_tokens: int = 0
    depth: int | None = None
    depth_source: str | None = None
    predicted_agreement: float | None = None
    layers_per_token: float | None = None

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def load_questions(path: Path, count: int) -> list[str]:
    """GSM8K lines: the LAST `count` questions (the first ones are training data elsewhere)."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if len(rows) < count:
        raise ValueError(f"{path} has {len(rows)} questions, {count} requested")
    return [row["question"] for row in rows[-count:]]


def load_conversations(path: Path, count: int) -> list[list[dict]]:
    """`count` chat conversations from a prompts file (messages/prompt lines, mixed over their
    sources) or a GSM8K file (question lines)."""
    from adadepth.training.data import first_prompts, read_prompts_jsonl

    with open(path) as f:
        first = json.loads(next(line for line in f if line.strip()))
    if "question" in first:
        return [[{"role": "user", "content": q}] for q in load_questions(path, count)]
    records = first_prompts(read_prompts_jsonl(str(path)), count)
    if len(records) < count:
        raise ValueError(f"{path} has {len(records)} prompts, {count} requested")
    return [r.messages for r in records]


def _count_lines(path: Path) -> int:
    with open(path) as f:
        return sum(1 for line in f if line.strip())


def _payload(cfg: ServeBenchConfig, messages: list[dict]) -> dict:
    # skip_special_tokens off: past EOS (ignored) the model often alternates its end-of-turn token
    # with "\n"; skipped, that token sends no chunk and the next chunk's gap spans two tokens, which
    # would count the model's output, not the server, in the inter-token latency.
    payload = {"model": cfg.model, "messages": messages,
               "max_tokens": cfg.max_tokens, "temperature": cfg.temperature, "ignore_eos": True,
               "skip_special_tokens": False, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.depth_value is not None:
        payload["depth"] = cfg.depth_value
    if cfg.quality is not None:
        payload["quality"] = cfg.quality
    return payload


async def _one_request(client, cfg: ServeBenchConfig, question: list[dict]) -> RequestResult:
    from adadepth.server.sse import aiter_sse_lines

    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/chat/completions", json=_payload(cfg, question)) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in aiter_sse_lines(response):
                if not line.startswith("data: "):
                    continue
                data = line[len("data: "):]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = chunk["error"].get("message", str(chunk["error"]))
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    result.layers_per_token = chunk["usage"].get("layers_per_token")
                if chunk.get("adadepth"):
                    result.depth = chunk["adadepth"].get("depth")
                    result.depth_source = chunk["adadepth"].get("source")
                    result.predicted_agreement = chunk["adadepth"].get("predicted_agreement")
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itl.append(now - last)
                        last = now
        result.latency = time.perf_counter() - start
        result.ok = last is not None
        if not result.ok:
            result.error = "the stream carried no content"
    except Exception as exc:  # noqa: BLE001 - a failed request is a result, not a crash of the run
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def _stats(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    arr = np.asarray(values) * 1000.0
    return {"mean": float(arr.mean()), **{f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES}}


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Seconds from the start at which `count` requests arrive: exponential gaps of mean 1/rate."""
    import random

    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(count):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def meets_slo(r: RequestResult, cfg: ServeBenchConfig) -> bool:
    if not r.ok:
        return False
    if cfg.slo_ttft_ms is not None and r.ttft * 1000 > cfg.slo_ttft_ms:
        return False
    return cfg.slo_tpot_ms is None or r.tpot is None or r.tpot * 1000 <= cfg.slo_tpot_ms


async def _run_level(client, cfg: ServeBenchConfig, questions: list[list[dict]], concurrency: int,
                     rate: float | None = None) -> dict:
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    start = time.perf_counter()
    arrivals = poisson_arrivals(rate, len(questions), cfg.seed) if rate else [0.0] * len(questions)

    async def limited(question: list[dict], at: float) -> RequestResult:
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if gate is None:
            return await _one_request(client, cfg, question)
        async with gate:
            return await _one_request(client, cfg, question)

    results = await asyncio.gather(*(limited(q, at) for q, at in zip(questions, arrivals)))
    duration = time.perf_counter() - start
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    depths = sorted({r.depth for r in ok if r.depth is not None})
    lpt = [r.layers_per_token for r in ok if r.layers_per_token is not None]
    good = [r for r in results if meets_slo(r, cfg)]
    with_depth = [r for r in ok if r.depth is not None]
    agreements = [r.predicted_agreement for r in ok if r.predicted_agreement is not None]
    sources: dict[str, int] = {}
    for r in ok:
        if r.depth_source is not None:
            sources[r.depth_source] = sources.get(r.depth_source, 0) + 1
    return {
        "concurrency": concurrency, "request_rate": rate, "num_requests": len(results), "completed": len(ok),
        "goodput_req_s": len(good) / duration if duration > 0 else 0.0,
        "slo_met_fraction": len(good) / len(results) if results else 0.0,
        "mean_depth": sum(r.depth for r in with_depth) / len(with_depth) if with_depth else None,
        "mean_predicted_agreement": sum(agreements) / len(agreements) if agreements else None,
        "depth_sources": sources,
        "failed": len(results) - len(ok), "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration, "total_output_tokens": output_tokens,
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "output_throughput_tok_s": output_tokens / duration if duration > 0 else 0.0,
        "request_throughput_req_s": len(ok) / duration if duration > 0 else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": _stats([gap for r in ok for gap in r.itl]),
        "e2e_latency_ms": _stats([r.latency for r in ok]),
        "depths": depths,
        "mean_layers_per_token": sum(lpt) / len(lpt) if lpt else None,
    }


def _repeated_level(runs: list[dict]) -> dict:
    """One level run `repeats` times: the run with the median throughput, plus every run and the
    median/min/max of the headline figures."""
    import numpy as np

    by_throughput = sorted(runs, key=lambda r: r["output_throughput_tok_s"])
    level = dict(by_throughput[(len(runs) - 1) // 2])
    figures = {
        "output_throughput_tok_s": [r["output_throughput_tok_s"] for r in runs],
        "ttft_p50_ms": [r["ttft_ms"]["p50"] for r in runs], "ttft_p99_ms": [r["ttft_ms"]["p99"] for r in runs],
        "itl_p50_ms": [r["itl_ms"]["p50"] for r in runs], "itl_p99_ms": [r["itl_ms"]["p99"] for r in runs],
    }
    level["repeats"] = {
        name: {"median": float(np.median(v)), "min": min(v), "max": max(v), "values": v}
        for name, v in figures.items() if all(x is not None for x in v)}
    level["runs"] = runs
    return level


def machine_info() -> dict:
    """Where the client ran (usually the server's machine too); the load says how shared it was."""
    from adadepth.benchmarks import machine

    return {**machine.machine_info(), "machine": platform.machine(), "hostname": socket.gethostname()}


async def run_benchmark(cfg: ServeBenchConfig) -> dict:
    import httpx

    needed = max([cfg.requests_at(c) for c in cfg.levels] + [cfg.requests_at_rate(r) for r in cfg.rates])
    try:
        questions = load_conversations(cfg.data_path(), needed)
    except ValueError:  # a long Poisson run: the prompts come round again
        available = load_conversations(cfg.data_path(), _count_lines(cfg.data_path()))
        questions = [available[i % len(available)] for i in range(needed)]
    machine = machine_info()
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    connections = max(cfg.levels) or needed
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers, limits=limits,
                                 timeout=httpx.Timeout(cfg.timeout_s)) as client:
        models = (await client.get("/v1/models")).json()
        for question in questions[:cfg.warmup]:
            warm = await _one_request(client, cfg, question)
            if not warm.ok:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        levels = []
        for c in ([] if cfg.rates else cfg.levels):
            runs = [await _run_level(client, cfg, questions[:cfg.requests_at(c)], c) for _ in range(cfg.repeats)]
            levels.append(runs[0] if cfg.repeats == 1 else _repeated_level(runs))
        for rate in cfg.rates:
            runs = [await _run_level(client, cfg, questions[:cfg.requests_at_rate(rate)], cfg.levels[0], rate)
                    for _ in range(cfg.repeats)]
            levels.append(runs[0] if cfg.repeats == 1 else _repeated_level(runs))
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "api_key"}
    config["depth"] = cfg.depth_value
    return {
        "label": cfg.label,
        "started_at": started,
        "config": config,
        "machine": machine,
        "server": models,
        "results": levels,
    }


def format_table(report: dict) -> str:
    def cell(stats: dict) -> str:
        values = [stats[f"p{p}"] for p in PERCENTILES]
        return "/".join("-" if v is None else f"{v:.0f}" for v in values)

    header = (f"{'conc':>4} {'ok':>5} {'req/s':>7} {'out tok/s':>9}  {'TTFT ms p50/90/99':>19}  "
              f"{'TPOT ms p50/90/99':>19}  {'ITL ms p50/90/99':>19}  {'E2E ms p50/90/99':>21}")
    lines = [f"serve benchmark '{report['label']}' ({report['config']['model']}, "
             f"{report['config']['max_tokens']} output tokens, depth {report['config']['depth']})", header]
    for r in report["results"]:
        if r.get("request_rate"):
            agreement = r.get("mean_predicted_agreement")
            has_slo = report["config"].get("slo_ttft_ms") is not None or report["config"].get("slo_tpot_ms") is not None
            goodput = (f"goodput {r['goodput_req_s']:.2f} req/s ({100 * r['slo_met_fraction']:.0f} % met the "
                       "objectives), " if has_slo else "")
            lines.append(f"rate {r['request_rate']:.2f}/s: {goodput}mean depth "
                         f"{r['mean_depth'] if r['mean_depth'] is None else round(r['mean_depth'], 1)}, mean predicted "
                         f"agreement {agreement if agreement is None else round(agreement, 3)}, sources {r['depth_sources']}")
        if "repeats" in r:
            tput = r["repeats"]["output_throughput_tok_s"]
            lines.append(f"{r['concurrency']:>4} {len(tput['values'])} runs: out tok/s median {tput['median']:.1f} "
                         f"(min {tput['min']:.1f}, max {tput['max']:.1f}); the median run:")
        lines.append(f"{r['concurrency']:>4} {r['completed']:>2}/{r['num_requests']:<2} "
                     f"{r['request_throughput_req_s']:>7.2f} {r['output_throughput_tok_s']:>9.1f}  "
                     f"{cell(r['ttft_ms']):>19}  {cell(r['tpot_ms']):>19}  {cell(r['itl_ms']):>19}  "
                     f"{cell(r['e2e_latency_ms']):>21}")
    return "\n".join(lines)


def main(cfg: ServeBenchConfig) -> dict:
    report = asyncio.run(run_benchmark(cfg))
    print(format_table(report))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


def _run(args: argparse.Namespace) -> None:
    from adadepth.cli_args import dataclass_from_args

    main(dataclass_from_args(ServeBenchConfig, args))


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_dataclass_args

    parser = bench_subparsers.add_parser("serve", help="latency/throughput of a running server (chat, streaming)")
    add_dataclass_args(parser, ServeBenchConfig)
    parser.set_defaults(func=_run)
