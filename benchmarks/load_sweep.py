"""`adadepth bench load`: goodput under Poisson arrivals, from half to twice what full depth can
serve, for three servers of the same model run side by side:

- `full`: every request at full depth (`--default-quality 1.0`), what a fixed-depth server does;
- `min`: `--depth-policy min`, each request at the smallest depth its quality needs (router);
- `load`: `--depth-policy load`, full depth while the objectives hold, down to that floor under load.

First the full-depth capacity is measured with the same client (requests per second of a closed
loop at `--capacity-concurrency`); the rates are `--rate-factors` times it. Requests name no depth
and no quality (the servers' default quality applies). For each rate the three servers take turns
(rotating order) so that the shared machine's drift hits them alike. Goodput counts requests that
met both objectives (`--slo-ttft-ms`, `--slo-tpot-ms`; the `load` server is given the same ones).
Writes JSON (+ PNG: goodput and mean depth against the request rate).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LoadSweepConfig:
    model: str = field(default="default", metadata={"help": "model the three servers load"})
    rate_factors: str = field(default="0.5,1.0,1.3,2.0", metadata={
        "help": "comma-separated request rates, as multiples of the measured full-depth capacity"})
    capacity_concurrency: int = field(default=64, metadata={
        "help": "closed-loop concurrency at which full-depth capacity (requests/s) is measured"})
    seconds: float = field(default=30.0, metadata={"help": "seconds of arrivals per rate and server"})
    max_tokens: int = field(default=128, metadata={"help": "output tokens per request (EOS ignored)"})
    slo_ttft_ms: float = field(default=2000.0, metadata={"help": "time-to-first-token objective"})
    slo_tpot_ms: float = field(default=100.0, metadata={
        "help": "time-per-output-token objective (the load server's --slo-itl-ms)"})
    quality: float = field(default=0.7, metadata={
        "help": "default quality of the min and load servers (their requests name none): the floor load may go down to"})
    port: int = field(default=8400, metadata={"help": "first of the three ports"})
    seed: int = field(default=0, metadata={"help": "seed of the arrivals (the same for every server)"})
    data: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl, as `adadepth bench serve --data` takes it"})
    out: str = field(default="benchmarks/results/load_sweep.json", metadata={"help": "JSON output (+ .png)"})
    raw_dir: str = field(default="/tmp/adadepth-load-sweep", metadata={
        "help": "where the servers' logs and each run's client JSON go"})

    def __post_init__(self) -> None:
        self.factors = [float(f) for f in self.rate_factors.split(",") if f.strip()]
        if not self.factors or any(not f > 0 for f in self.factors):
            raise ValueError("rate_factors: comma-separated numbers > 0")
        if self.capacity_concurrency < 1 or self.seconds <= 0 or self.max_tokens < 1:
            raise ValueError("capacity_concurrency and max_tokens must be >= 1, seconds > 0")


def server_commands(cfg: LoadSweepConfig) -> dict[str, list[str]]:
    base = [sys.executable, "-m", "adadepth.cli", "serve", "--model", cfg.model, "--no-access-log",
            "--uvicorn-log-level", "warning"]
    return {
        "full": base + ["--default-quality", "1.0", "--port", str(cfg.port)],
        "min": base + ["--default-quality", str(cfg.quality), "--depth-policy", "min", "--port", str(cfg.port + 1)],
        "load": base + ["--default-quality", str(cfg.quality), "--depth-policy", "load",
                        "--slo-ttft-ms", str(cfg.slo_ttft_ms), "--slo-itl-ms", str(cfg.slo_tpot_ms),
                        "--port", str(cfg.port + 2)],
    }


def _wait_up(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout:.0f} s")


def _bench(cfg: LoadSweepConfig, url: str, extra: list[str], out: Path) -> dict:
    from adadepth.benchmarks.serve_bench import ServeBenchConfig, run_benchmark

    import asyncio

    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        served = json.loads(r.read())["data"][0]["id"]
    args = dict(base_url=url, model=served, max_tokens=cfg.max_tokens, slo_ttft_ms=cfg.slo_ttft_ms, slo_tpot_ms=cfg.slo_tpot_ms,
                seed=cfg.seed, warmup=0, out=str(out), data=cfg.data)
    for flag, value in zip(extra[::2], extra[1::2]):
        args[flag] = value
    bench = ServeBenchConfig(**args)
    report = asyncio.run(run_benchmark(bench))
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report["results"][0]


def run(cfg: LoadSweepConfig) -> dict:
    from adadepth.benchmarks.machine import machine_info, save_report

    raw = Path(cfg.raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    commands = server_commands(cfg)
    procs: dict[str, subprocess.Popen] = {}
    urls = {name: f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}" for name, cmd in commands.items()}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for name, cmd in commands.items():  # one at a time: loading is the heavy part
            log = open(raw / f"{name}.log", "w")
            # Not from the repository root, where `python -m` would put its top-level folders on sys.path.
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=raw)
            _wait_up(urls[name], procs[name])
        # Warm every server, then the full-depth capacity with the same client.
        for name in commands:
            _bench(cfg, urls[name], ["concurrency", "4", "num_requests", 4], raw / f"warm_{name}.json")
        capacity_level = _bench(cfg, urls["full"], ["concurrency", str(cfg.capacity_concurrency),
                                                    "num_requests", 2 * cfg.capacity_concurrency],
                                raw / "capacity.json")
        capacity = capacity_level["request_throughput_req_s"]
        if not capacity > 0:
            raise RuntimeError(f"no request completed while measuring capacity: {capacity_level['errors']}")
        print(f"full-depth capacity: {capacity:.2f} req/s ({capacity_level['output_throughput_tok_s']:.0f} tok/s "
              f"at concurrency {cfg.capacity_concurrency})", flush=True)
        rows = []
        names = list(commands)
        for i, factor in enumerate(cfg.factors):
            rate = factor * capacity
            count = max(16, round(cfg.seconds * rate))
            order = names[i % 3:] + names[: i % 3]
            row = {"rate_factor": factor, "request_rate": rate, "num_requests": count}
            for name in order:
                level = _bench(cfg, urls[name], ["request_rate", str(rate), "concurrency", "0",
                                                 "num_requests", count], raw / f"{name}_{factor}.json")
                row[name] = {k: level[k] for k in (
                    "completed", "failed", "goodput_req_s", "slo_met_fraction", "request_throughput_req_s",
                    "output_throughput_tok_s", "mean_depth", "mean_predicted_agreement", "depth_sources",
                    "ttft_ms", "tpot_ms", "itl_ms")}
                print(f"x{factor:.1f} ({rate:.2f}/s) {name:>4}: goodput {level['goodput_req_s']:.2f} req/s "
                      f"({100 * level['slo_met_fraction']:.0f} % met), mean depth {level['mean_depth']}, "
                      f"TTFT p99 {level['ttft_ms']['p99']:.0f} ms, TPOT p99 {level['tpot_ms']['p99']:.0f} ms",
                      flush=True)
            rows.append(row)
        allowance = _metric(urls["load"], "adadepth:depth_allowance")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    machine = machine_info()
    report = {"benchmark": "load_sweep", "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench load " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items()),
              "config": dataclasses.asdict(cfg), "machine": machine, "servers": {n: " ".join(c[1:]) for n, c in
                                                                                  commands.items()},
              "capacity": {"concurrency": cfg.capacity_concurrency, "request_throughput_req_s": capacity,
                           "output_throughput_tok_s": capacity_level["output_throughput_tok_s"]},
              "load_allowance_at_end": allowance, "kv_admission": kv_admission(cfg), "rows": rows}
    print(f"wrote {save_report(report, cfg.out, plot)}")
    return report


def kv_admission(cfg: LoadSweepConfig, depth_fractions: tuple[float, ...] = (1.0, 0.7)) -> dict:
    """How many requests (held-out prompts, in order, each with max_tokens of output) fit in the
    servers' KV cache at once, at full depth and at reduced depth: the engine's own cache size,
    page layout and block manager, no model run."""
    from adadepth.config import CacheConfig, ModelConfig
    from adadepth.engine.block_manager import BlockManager
    from adadepth.engine.sequence import Sequence
    from adadepth.model.kv_layout import KVLayout
    from adadepth.model.loader import load_config, load_plan, resolve_model
    from adadepth.sampling_params import SamplingParams
    from transformers import AutoTokenizer

    from adadepth.benchmarks.serve_bench import _count_lines, load_conversations

    cache = CacheConfig()
    resolved = resolve_model(cfg.model, ModelConfig().cache_dir)
    num_layers = load_config(resolved.checkpoint_dir).num_hidden_layers
    layout = KVLayout.for_ranks(load_plan(resolved.plan_dir, num_layers).rank, cache.kv_group_layers)
    tok = AutoTokenizer.from_pretrained(resolved.checkpoint_dir)
    path = Path(cfg.data) if Path(cfg.data).is_absolute() else REPO_ROOT / cfg.data
    chats = load_conversations(path, _count_lines(path))
    lengths = [len(tok.apply_chat_template(c, add_generation_prompt=True)) + cfg.max_tokens for c in chats]
    result = {"num_kv_tokens": cache.num_kv_tokens, "block_size": cache.block_size,
              "kv_group_layers": layout.group_layers, "max_tokens": cfg.max_tokens, "depths": {}}
    for fraction in depth_fractions:
        depth = max(1, round(fraction * num_layers))
        manager = BlockManager(cache.num_pages(layout.num_groups), cache.block_size, layout)
        admitted = 0
        while manager.ensure_capacity(Sequence(f"r{admitted}", None, [0], SamplingParams()),
                                      lengths[admitted % len(lengths)], depth):
            admitted += 1
        result["depths"][str(depth)] = admitted
    full, reduced = (result["depths"][str(max(1, round(f * num_layers)))] for f in depth_fractions[:2])
    result["ratio"] = reduced / full
    return result


def _metric(url: str, name: str) -> float | None:
    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + "{") or line.startswith(name + " "):
                    return float(line.rsplit(" ", 1)[1])
    except OSError:
        return None
    return None


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    rates = [r["request_rate"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, style in (("full", "s-"), ("min", "^--"), ("load", "o-")):
        a.plot(rates, [r[name]["goodput_req_s"] for r in rows], style, label=name)
        b.plot(rates, [r[name]["mean_depth"] or 0 for r in rows], style, label=name)
    a.plot(rates, rates, ":", color="grey", label="offered")
    a.set_title(f"goodput (TTFT <= {report['config']['slo_ttft_ms']:.0f} ms, "
                f"TPOT <= {report['config']['slo_tpot_ms']:.0f} ms)")
    a.set_ylabel("requests / s")
    b.set_title("mean depth (layers)")
    for ax in (a, b):
        ax.set_xlabel("request rate (Poisson, requests / s)")
        ax.axvline(report["capacity"]["request_throughput_req_s"], color="grey", alpha=0.3)
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"depth under load ({report['machine'].get('cpu', '')}); grey line: full-depth capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "load", LoadSweepConfig, run,
                       help="goodput under Poisson arrivals: full depth, --depth-policy min and load "
                            "side by side")
