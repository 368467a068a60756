"""`adadepth bench soak`: a live server under a mixed, partly hostile load for a bounded time.

It starts `adadepth serve` (loopback only) unless given --url, then runs `concurrency` clients
until `duration` seconds or `max_requests` requests have passed. Each client loops over random
requests: chat or completions, streaming or not, n of 1 or 2, stop strings, random depths and
qualities; 10 % of requests are malformed (each must get a 4xx with OpenAI's error body) and
10 % of streams hang up after a few events. Every accepted request must end complete (every
choice has a finish_reason; a stream ends in [DONE]) or with an error body or error event, and
once the load stops the server must hold no running request and no KV block. The server's RSS
is sampled throughout. Outcomes, latency percentiles and RSS over time go to JSON and a plot.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "the a quick brown fox jumps over lazy dog how many apples does Tom have if he sells three".split()
MALFORMED = [
    b"{not json", b"[]", b'{"prompt": 5}', b'{"prompt": "hi", "max_tokens": -1}', b'{"prompt": "hi", "n": 0}',
    b'{"messages": []}', b'{"messages": [{"role": "robot", "content": "x"}]}', b'{"prompt": "hi", "depth": 0}',
    b'{"prompt": "hi", "temperature": "hot"}', b'{"prompt": "hi", "logit_bias": {"x": 1}}',
    b'{"prompt": "hi", "structured_outputs": {"regex": "(("}}', b'{"prompt": "hi", "stop": [""]}',
]


def require_loopback(url: str, what: str) -> None:
    """Load and fuzz runs target only this machine's loopback addresses."""
    if url and not url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        raise ValueError(f"{what} only targets loopback addresses")


@dataclass
class SoakConfig:
    model: str = field(default="default", metadata={"help": "model the started server serves"})
    url: str = field(default="", metadata={"help": "soak a server already running here instead (loopback)"})
    server_pid: int = field(default=0, metadata={"help": "with --url: the server's pid, for RSS"})
    server_args: str = field(default="", metadata={"help": "extra `adadepth serve` flags for the started server"})
    duration: float = field(default=60.0, metadata={"help": "seconds of load"})
    max_requests: int = field(default=100_000, metadata={"help": "stop after this many requests"})
    concurrency: int = field(default=16, metadata={"help": "clients sending requests at once"})
    max_tokens: int = field(default=48, metadata={"help": "largest max_tokens a request asks for"})
    seed: int = field(default=0, metadata={"help": "seed of the request mix"})
    rss_interval: float = field(default=2.0, metadata={"help": "seconds between RSS samples"})
    warmup: float = field(default=0.2, metadata={"help": "share of the run before RSS growth is measured"})
    out: str = field(default="benchmarks/results/soak.json", metadata={"help": "JSON output (a .png beside it)"})

    def __post_init__(self) -> None:
        require_loopback(self.url, "the soak")
        if self.duration <= 0 or self.max_requests < 1 or self.concurrency < 1 or self.max_tokens < 2:
            raise ValueError("duration, max_requests, concurrency must be positive and max_tokens >= 2")
        if not 0 <= self.warmup < 1:
            raise ValueError("warmup must be in [0, 1)")


@dataclass
class Outcome:
    kind: str        # complete | error | malformed_ok | disconnected | lost
    endpoint: str
    stream: bool
    status: int
    seconds: float
    ttft: float | None = None
    detail: str = ""


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def random_request(rng: random.Random, max_tokens: int) -> tuple[str, dict]:
    chat = rng.random() < 0.5
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    body: dict = {"max_tokens": rng.randint(1, max_tokens), "temperature": rng.choice([0.0, 0.7, 1.0]),
                  "stream": rng.random() < 0.5, "n": 2 if rng.random() < 0.2 else 1}
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    if rng.random() < 0.3:
        body["stop"] = [rng.choice(WORDS), "\n\n"]
    r = rng.random()
    if r < 0.3:
        body["depth"] = rng.randint(12, 30) if rng.random() < 0.5 else rng.choice([0.5, 0.7, 0.9, 1.0])
    elif r < 0.6:
        body["quality"] = rng.choice([0.6, 0.8, 0.9, 0.95])
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


def complete_choices(payload: dict, n: int) -> bool:
    choices = payload.get("choices") or []
    return len(choices) == n and all(c.get("finish_reason") for c in choices)


async def one_request(client, rng: random.Random, cfg: SoakConfig) -> Outcome:
    from adadepth.server.sse import aiter_sse_lines

    t0 = time.perf_counter()
    if rng.random() < 0.1:
        url = rng.choice(["/v1/completions", "/v1/chat/completions"])
        response = await client.post(url, content=rng.choice(MALFORMED), headers={"content-type": "application/json"})
        ok = 400 <= response.status_code < 500 and set(response.json().get("error", {})) >= {"message", "type"}
        return Outcome("malformed_ok" if ok else "lost", url, False, response.status_code, time.perf_counter() - t0,
                       detail="" if ok else response.text[:200])
    url, body = random_request(rng, cfg.max_tokens)
    n = body["n"]
    if not body["stream"]:
        response = await client.post(url, json=body)
        seconds = time.perf_counter() - t0
        payload = response.json()
        if response.status_code == 200:
            kind = "complete" if complete_choices(payload, n) else "lost"
        else:
            kind = "error" if "error" in payload and response.status_code < 500 else "lost"
        return Outcome(kind, url, False, response.status_code, seconds, detail="" if kind != "lost" else response.text[:200])
    hang_up_after = rng.randint(1, 4) if rng.random() < 0.1 else None
    finished, ttft, events = set(), None, 0
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            kind = "error" if response.status_code < 500 and '"error"' in text else "lost"
            return Outcome(kind, url, True, response.status_code, time.perf_counter() - t0, detail=text[:200])
        async for line in aiter_sse_lines(response):
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
            if data == "[DONE]":
                ok = len(finished) == n
                return Outcome("complete" if ok else "lost", url, True, 200, time.perf_counter() - t0, ttft,
                               "" if ok else f"[DONE] with {len(finished)}/{n} choices finished")
            payload = json.loads(data)
            if "error" in payload:
                return Outcome("error", url, True, 200, time.perf_counter() - t0, ttft, payload["error"].get("code") or "")
            for c in payload.get("choices") or []:
                if c.get("finish_reason"):
                    finished.add(c["index"])
            if hang_up_after is not None and events >= hang_up_after:
                return Outcome("disconnected", url, True, 200, time.perf_counter() - t0, ttft)
    return Outcome("lost", url, True, 200, time.perf_counter() - t0, ttft, "stream ended without [DONE]")


async def soak(cfg: SoakConfig, base_url: str, pid: int | None) -> dict:
    import httpx

    deadline = time.monotonic() + cfg.duration
    outcomes: list[Outcome] = []
    rss: list[tuple[float, float]] = []
    started = time.monotonic()
    budget = [cfg.max_requests]

    async def worker(i: int) -> None:
        rng = random.Random(cfg.seed * 1000 + i)
        async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
            while time.monotonic() < deadline and budget[0] > 0:
                budget[0] -= 1
                try:
                    outcomes.append(await one_request(client, rng, cfg))
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    outcomes.append(Outcome("lost", "?", False, -1, 0.0, detail=f"{type(exc).__name__}: {exc}"))

    async def sample_rss() -> None:
        while time.monotonic() < deadline and budget[0] > 0:
            value = rss_mb(pid) if pid else None
            if value is not None:
                rss.append((round(time.monotonic() - started, 2), round(value, 1)))
            await asyncio.sleep(cfg.rss_interval)

    await asyncio.gather(sample_rss(), *(worker(i) for i in range(cfg.concurrency)))
    elapsed = time.monotonic() - started
    # After the load: nothing may still run or hold KV blocks (aborted streams included).
    idle = None
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        for _ in range(300):
            metrics = parse_metrics((await client.get("/metrics")).text)
            idle = metrics
            if metrics.get("vllm:num_requests_running", 1) == 0 and metrics.get("vllm:kv_cache_usage_perc", 1) == 0:
                break
            await asyncio.sleep(0.1)
        healthy = (await client.get("/health")).status_code == 200
    if pid:
        value = rss_mb(pid)
        if value is not None:
            rss.append((round(time.monotonic() - started, 2), round(value, 1)))
    return summarize(cfg, outcomes, rss, elapsed, idle or {}, healthy)


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("vllm:") and "{" in line:
            name, value = line.split("{", 1)[0], line.rsplit(" ", 1)[1]
            if name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc"):
                out[name] = out.get(name, 0.0) + float(value)
    return out


def percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": round(qs[49], 4), "p90": round(qs[89], 4), "p99": round(qs[98], 4), "max": round(max(values), 4)}


def summarize(cfg: SoakConfig, outcomes: list[Outcome], rss: list[tuple[float, float]], elapsed: float,
              idle: dict, healthy: bool) -> dict:
    from adadepth.benchmarks.machine import machine_info

    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    after = [v for t, v in rss if t >= cfg.warmup * elapsed]
    growth = (after[-1] / after[0] - 1) if len(after) >= 2 else None
    machine = machine_info()
    return {
        "benchmark": "soak", "date": machine["date"], "commit": machine["commit"], "machine": machine,
        "config": dataclasses.asdict(cfg), "seconds": round(elapsed, 1), "requests": len(outcomes),
        "outcomes": counts, "lost": counts.get("lost", 0),
        "lost_examples": [dataclasses.asdict(o) for o in outcomes if o.kind == "lost"][:10],
        "error_codes": sorted({o.detail for o in outcomes if o.kind == "error" and o.detail})[:20],
        "latency_s": {"complete": percentiles([o.seconds for o in outcomes if o.kind == "complete"]),
                      "ttft_stream": percentiles([o.ttft for o in outcomes if o.ttft is not None and o.kind == "complete"])},
        "after_load": {"healthy": healthy, **idle},
        "kv_blocks_leaked": bool(idle.get("vllm:kv_cache_usage_perc", 0) > 0),
        "rss_mb": rss, "rss_growth_after_warmup": None if growth is None else round(growth, 4),
    }


def start_server(cfg: SoakConfig) -> tuple[subprocess.Popen, str]:
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "adadepth.cli", "serve", "--model", cfg.model, "--host", "127.0.0.1",
           "--port", str(port), "--no-access-log", "--uvicorn-log-level", "warning", *cfg.server_args.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {' '.join(cmd)}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not become healthy in 600 s")


def run(cfg: SoakConfig) -> dict:
    proc = None
    if cfg.url:
        url, pid = cfg.url.rstrip("/"), cfg.server_pid or None
    else:
        proc, url = start_server(cfg)
        pid = proc.pid
    try:
        report = asyncio.run(soak(cfg, url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            report_exit = proc.wait(120)
    if proc is not None:
        report["server_exit_code_after_sigterm"] = report_exit
    from adadepth.benchmarks.machine import save_report

    out = save_report(report, cfg.out, plot)
    print(f"{report['requests']} requests in {report['seconds']} s: {report['outcomes']}; lost {report['lost']}; "
          f"KV leaked {report['kv_blocks_leaked']}; RSS growth after warm-up {report['rss_growth_after_warmup']}\n"
          f"wrote {out}")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    if report["rss_mb"]:
        left.plot(*zip(*report["rss_mb"]), marker=".")
    left.set_xlabel("seconds")
    left.set_ylabel("server RSS (MiB)")
    left.set_title(f"RSS; growth after warm-up {report['rss_growth_after_warmup']}")
    kinds = sorted(report["outcomes"])
    right.bar(kinds, [report["outcomes"][k] for k in kinds])
    right.set_title(f"{report['requests']} requests, concurrency {report['config']['concurrency']}")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_checked(cfg) -> None:
    """run(cfg), exiting 1 when the run found a failure."""
    report = run(cfg)
    if report["lost"] or report["kv_blocks_leaked"]:
        sys.exit(1)


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "soak", SoakConfig, _run_checked,
                       help="a live server under mixed, partly hostile load (loopback only)")

