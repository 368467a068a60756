"""`adadepth bench load` end to end on the tiny model (three real servers, a few requests)."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.load_sweep import LoadSweepConfig, run, server_commands


def test_servers_differ_only_in_their_depth_policy():
    cmds = server_commands(LoadSweepConfig(port=9000))
    assert cmds["full"][cmds["full"].index("--default-quality") + 1] == "1.0"
    assert "--depth-policy" not in cmds["full"]
    assert cmds["min"][cmds["min"].index("--depth-policy") + 1] == "min"
    load = cmds["load"]
    assert load[load.index("--depth-policy") + 1] == "load" and load[load.index("--slo-itl-ms") + 1] == "100.0"
    assert [c[c.index("--port") + 1] for c in cmds.values()] == ["9000", "9001", "9002"]
    with pytest.raises(ValueError):
        LoadSweepConfig(rate_factors="1,0")


def test_sweep_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    out = tmp_path / "sweep.json"
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}],
                                           "source": "s"}) + "\n" for i in range(20)))
    report = run(LoadSweepConfig(model=tiny_llama, rate_factors="0.5,1.0", capacity_concurrency=4, seconds=2.0,
                                 max_tokens=4, port=18470, out=str(out), raw_dir=str(tmp_path / "raw"),
                                 data=str(prompts)))
    assert [r["rate_factor"] for r in report["rows"]] == [0.5, 1.0]
    assert report["capacity"]["request_throughput_req_s"] > 0
    for row in report["rows"]:
        for name in ("full", "min", "load"):
            assert row[name]["completed"] == row["num_requests"] and row[name]["failed"] == 0
            assert row[name]["mean_depth"] == 6  # no router on the tiny model: full depth everywhere
    assert json.loads(out.read_text())["servers"]["load"].count("--depth-policy load") == 1


def test_decisions_run_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    """`adadepth bench decisions`: phases back to back, the allowance traced from /metrics (the
    tiny model has no router: the allowance stays at full depth)."""
    from adadepth.benchmarks.load_decisions import LoadDecisionsConfig, run as run_decisions

    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}],
                                           "source": "s"}) + "\n" for i in range(20)))
    out = tmp_path / "d.json"
    cfg = LoadDecisionsConfig(rates="4,8", phase_seconds=1.5, model=tiny_llama, max_tokens=4, port=18480,
                              out=str(out), raw_dir=str(tmp_path / "raw"), data=str(prompts))
    report = run_decisions(cfg)
    assert [p["request_rate"] for p in report["phases"]] == [4.0, 8.0]
    assert all(p["completed"] == max(8, round(1.5 * p["request_rate"])) for p in report["phases"])
    assert report["trace"] and {s["allowance"] for s in report["trace"] if s["allowance"] is not None} == {6.0}
    assert all(p["allowance_changes"] == 0 for p in report["phases"])
    assert json.loads(out.read_text())["server"].count("--depth-policy load") == 1
    with pytest.raises(ValueError):
        LoadDecisionsConfig(rates="1,0")
