"""`adadepth bench decisions`: the `--depth-policy load` controller's decisions over time, on one
server under Poisson load that rises and falls (`--rates`, one phase each, back to back).

The server's `adadepth:depth_allowance` (the depth routed requests may get), running and waiting
requests are read from its /metrics twice a second through the whole run; per phase: the client's
figures (goodput, mean depth, latency percentiles) and how often the allowance changed. Writes
JSON (+ PNG: allowance and queue over time, phases marked).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from adadepth.benchmarks.load_sweep import LoadSweepConfig, _bench, _metric, _wait_up, server_commands


@dataclass
class LoadDecisionsConfig:
    rates: str = field(default="0.9,2.3,0.9", metadata={
        "help": "comma-separated request rates (per second), one phase each, in order"})
    phase_seconds: float = field(default=60.0, metadata={"help": "seconds of arrivals per phase"})
    model: str = field(default="default", metadata={"help": "model the server loads"})
    max_tokens: int = field(default=128, metadata={"help": "output tokens per request (EOS ignored)"})
    slo_ttft_ms: float = field(default=2000.0, metadata={"help": "time-to-first-token objective"})
    slo_tpot_ms: float = field(default=100.0, metadata={"help": "time-per-output-token objective"})
    quality: float = field(default=0.7, metadata={"help": "the server's default quality (the requests' floor)"})
    port: int = field(default=8450, metadata={"help": "the server's port"})
    data: str = field(default="benchmarks/data/heldout_prompts.jsonl", metadata={
        "help": "prompts jsonl, as `adadepth bench serve --data` takes it"})
    out: str = field(default="benchmarks/results/load_decisions.json", metadata={"help": "JSON output (+ .png)"})
    raw_dir: str = field(default="/tmp/adadepth-load-decisions", metadata={"help": "server log and client JSON"})

    def __post_init__(self) -> None:
        self.rate_list = [float(r) for r in self.rates.split(",") if r.strip()]
        if not self.rate_list or any(not r > 0 for r in self.rate_list) or self.phase_seconds <= 0:
            raise ValueError("rates: comma-separated numbers > 0; phase_seconds > 0")


def run(cfg: LoadDecisionsConfig) -> dict:
    from adadepth.benchmarks.machine import machine_info, save_report

    raw = Path(cfg.raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    sweep = LoadSweepConfig(model=cfg.model, max_tokens=cfg.max_tokens, slo_ttft_ms=cfg.slo_ttft_ms,
                            slo_tpot_ms=cfg.slo_tpot_ms, quality=cfg.quality, port=cfg.port - 2, raw_dir=str(raw),
                            data=cfg.data)
    cmd = server_commands(sweep)["load"]
    url = f"http://127.0.0.1:{cfg.port}"
    trace: list[dict] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            trace.append({"t": round(time.monotonic() - t0, 2),
                          "allowance": _metric(url, "adadepth:depth_allowance"),
                          "running": _metric(url, "vllm:num_requests_running"),
                          "waiting": _metric(url, "vllm:num_requests_waiting")})
            stop.wait(0.5)

    with open(raw / "load.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                cwd=raw)
        try:
            _wait_up(url, proc)
            _bench(sweep, url, ["concurrency", "4", "num_requests", 4], raw / "warm.json")
            time.sleep(3)
            t0 = time.monotonic()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            phases = []
            for i, rate in enumerate(cfg.rate_list):
                start = time.monotonic() - t0
                count = max(8, round(cfg.phase_seconds * rate))
                level = _bench(sweep, url, ["request_rate", str(rate), "concurrency", "0", "num_requests", count,
                                            "seed", i], raw / f"phase{i}.json")
                end = time.monotonic() - t0
                window = [s["allowance"] for s in trace if start <= s["t"] <= end and s["allowance"] is not None]
                phases.append({"request_rate": rate, "start_s": round(start, 1), "end_s": round(end, 1),
                               "allowance_changes": sum(1 for a, b in zip(window, window[1:]) if a != b),
                               "allowance_range": [min(window), max(window)] if window else None,
                               **{k: level[k] for k in ("completed", "goodput_req_s", "slo_met_fraction", "mean_depth",
                                                        "mean_predicted_agreement", "depth_sources", "ttft_ms",
                                                        "tpot_ms")}})
                print(f"phase {i} ({rate}/s, {start:.0f}-{end:.0f} s): {100 * level['slo_met_fraction']:.0f} % within "
                      f"the objectives, mean depth {level['mean_depth']:.1f}, allowance "
                      f"{phases[-1]['allowance_range']} with {phases[-1]['allowance_changes']} changes", flush=True)
        finally:
            stop.set()
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    machine = machine_info()
    report = {"benchmark": "load_decisions", "date": machine["date"], "commit": machine["commit"],
              "command": "adadepth bench decisions " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(cfg).items()),
              "config": dataclasses.asdict(cfg), "machine": machine, "server": " ".join(cmd[1:]),
              "phases": phases, "trace": trace}
    print(f"wrote {save_report(report, cfg.out, plot)}")
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trace = [s for s in report["trace"] if s["allowance"] is not None]
    fig, (a, b) = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    a.step([s["t"] for s in trace], [s["allowance"] for s in trace], where="post")
    a.set_ylabel("allowance (layers)")
    b.plot([s["t"] for s in trace], [s["running"] or 0 for s in trace], label="running")
    b.plot([s["t"] for s in trace], [s["waiting"] or 0 for s in trace], label="waiting")
    b.set_ylabel("requests")
    b.set_xlabel("seconds")
    b.legend()
    for p in report["phases"]:
        for ax in (a, b):
            ax.axvline(p["start_s"], color="grey", alpha=0.3)
        a.text(p["start_s"], a.get_ylim()[1], f" {p['request_rate']}/s", va="top", fontsize=8)
    a.set_title(f"--depth-policy load over time ({report['machine'].get('cpu', '')})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_parser(bench_subparsers) -> None:
    from adadepth.cli_args import add_config_command

    add_config_command(bench_subparsers, "decisions", LoadDecisionsConfig, run,
                       help="the load policy's decisions over time under rising and falling Poisson load")
