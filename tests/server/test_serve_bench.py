"""`adadepth bench serve` against the tiny test server, with small numbers."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.serve_bench import ServeBenchConfig, load_questions
from adadepth.cli import build_parser, main


@pytest.fixture
def questions(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    rows = [{"question": f"question {i}: what is {i} + {i}?", "answer": "#### 0"} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_takes_the_last_questions(questions):
    assert load_questions(questions, 2) == ["question 4: what is 4 + 4?", "question 5: what is 5 + 5?"]
    with pytest.raises(ValueError):
        load_questions(questions, 7)


def test_config_validation():
    cfg = ServeBenchConfig(concurrency="1, 4,16", depth="0.5", label="x")
    assert cfg.levels == [1, 4, 16] and cfg.depth_value == 0.5 and cfg.out.endswith("benchmarks/results/serve_x.json")
    assert ServeBenchConfig(depth="3").depth_value == 3
    with pytest.raises(ValueError):
        ServeBenchConfig(concurrency="0")


def test_bench_serve_cli_against_the_test_server(server, questions, tmp_path, capsys):
    out = tmp_path / "serve_tiny.json"
    main(["bench", "serve", "--base-url", server.base_url, "--model", server.model, "--concurrency", "1,2",
          "--num-requests", "3", "--max-tokens", "4", "--depth", "3", "--label", "tiny", "--data", str(questions),
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["label"] == "tiny" and report["config"]["depth"] == 3
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["platform"]
    assert report["server"]["data"][0]["id"] == server.model
    assert [r["concurrency"] for r in report["results"]] == [1, 2]
    for level in report["results"]:
        assert level["completed"] == 3 and level["failed"] == 0
        assert level["total_output_tokens"] == 12
        assert level["output_throughput_tok_s"] > 0
        assert level["depths"] == [3] and level["mean_layers_per_token"] == 3.0
        for metric in ("ttft_ms", "tpot_ms", "e2e_latency_ms", "itl_ms"):
            stats = level[metric]
            assert set(stats) == {"mean", "p50", "p90", "p99"}
        assert 0 < level["ttft_ms"]["p50"] <= level["e2e_latency_ms"]["p50"]
        assert level["ttft_ms"]["p50"] <= level["ttft_ms"]["p90"] <= level["ttft_ms"]["p99"]
    printed = capsys.readouterr().out
    assert "TTFT" in printed and str(out) in printed


def test_bench_is_extensible():
    parser = build_parser()
    args = parser.parse_args(["bench", "serve", "--num-requests", "2"])
    assert args.bench_command == "serve" and args.num_requests == 2
