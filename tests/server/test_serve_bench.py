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
          "--num-requests", "3", "--repeats", "2", "--max-tokens", "4", "--depth", "3", "--label", "tiny",
          "--data", str(questions),
          "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["label"] == "tiny" and report["config"]["depth"] == 3
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["platform"]
    assert report["server"]["data"][0]["id"] == server.model
    assert [r["concurrency"] for r in report["results"]] == [1, 2]
    for level in report["results"]:
        assert level["completed"] == 3 and level["failed"] == 0 and len(level["runs"]) == 2
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


def test_prompt_files_are_taken_one_source_after_another(tmp_path):
    from adadepth.benchmarks.serve_bench import load_conversations

    path = tmp_path / "prompts.jsonl"
    rows = ([{"messages": [{"role": "user", "content": f"g{i}"}], "source": "gsm8k"} for i in range(3)]
            + [{"prompt": f"t{i}", "source": "t0"} for i in range(2)])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = [m[-1]["content"] for m in load_conversations(path, 5)]
    assert got == ["g0", "t0", "g1", "t1", "g2"]
    with pytest.raises(ValueError, match="6 requested"):
        load_conversations(path, 6)


def test_the_shipped_prompts_serve_every_default_level():
    from adadepth.benchmarks.serve_bench import load_conversations

    cfg = ServeBenchConfig(concurrency="1,16,64")
    assert [cfg.requests_at(c) for c in cfg.levels] == [8, 32, 128]
    chats = load_conversations(cfg.data_path(), 128)
    assert len(chats) == 128 and all(c[-1]["role"] == "user" and c[-1]["content"] for c in chats)


def test_repeats_report_the_median_run_and_the_spread():
    from adadepth.benchmarks.serve_bench import _repeated_level

    def run(tok_s, itl):
        stats = {"mean": itl, "p50": itl, "p90": itl, "p99": 3 * itl}
        return {"concurrency": 4, "output_throughput_tok_s": tok_s, "ttft_ms": stats, "itl_ms": stats}

    level = _repeated_level([run(10.0, 5.0), run(30.0, 7.0), run(20.0, 6.0)])
    assert level["output_throughput_tok_s"] == 20.0 and level["itl_ms"]["p50"] == 6.0     # the median run
    assert level["repeats"]["output_throughput_tok_s"] == {"median": 20.0, "min": 10.0, "max": 30.0,
                                                           "values": [10.0, 30.0, 20.0]}
    assert level["repeats"]["itl_p99_ms"]["max"] == 21.0 and len(level["runs"]) == 3


def test_poisson_arrivals_are_seeded_with_the_asked_rate():
    from adadepth.benchmarks.serve_bench import poisson_arrivals

    times = poisson_arrivals(4.0, 4000, seed=1)
    assert times == poisson_arrivals(4.0, 4000, seed=1) and times != poisson_arrivals(4.0, 4000, seed=2)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    assert all(g > 0 for g in gaps)
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.05)             # mean gap 1 / rate
    # Exponential gaps: as many above the mean as P(X > mean) = 1/e says.
    assert sum(g > 0.25 for g in gaps) / len(gaps) == pytest.approx(0.3679, abs=0.03)
    with pytest.raises(ValueError):
        ServeBenchConfig(request_rate="2,0")
    with pytest.raises(ValueError):
        ServeBenchConfig(request_rate="2", concurrency="1,4")


def test_request_rate_run_reports_goodput(server, questions, tmp_path):
    out = tmp_path / "rate.json"
    main(["bench", "serve", "--base-url", server.base_url, "--model", server.model, "--request-rate", "20,40",
          "--concurrency", "0", "--num-requests", "5", "--max-tokens", "4", "--depth", "3", "--data", str(questions),
          "--slo-ttft-ms", "60000", "--slo-tpot-ms", "0.000001", "--out", str(out)])
    report = json.loads(out.read_text())
    assert [r["request_rate"] for r in report["results"]] == [20.0, 40.0]
    for level in report["results"]:
        assert level["completed"] == 5 and level["mean_depth"] == 3 and level["depth_sources"] == {"request": 5}
        # No request can meet a TPOT of a nanosecond: goodput 0 although every request completed.
        assert level["goodput_req_s"] == 0 and level["slo_met_fraction"] == 0
    main(["bench", "serve", "--base-url", server.base_url, "--model", server.model, "--request-rate", "20",
          "--concurrency", "0", "--num-requests", "5", "--max-tokens", "4", "--data", str(questions),
          "--slo-ttft-ms", "60000", "--out", str(out)])
    level = json.loads(out.read_text())["results"][0]
    assert level["slo_met_fraction"] == 1.0 and level["goodput_req_s"] == pytest.approx(
        level["request_throughput_req_s"])


def test_requests_keep_special_tokens_so_every_token_is_a_chunk():
    """Past an ignored EOS the model emits its end-of-turn token between newlines; skipped, that
    token sends no chunk and the gap after it would count two tokens as one inter-token latency."""
    from adadepth.benchmarks.serve_bench import _payload

    payload = _payload(ServeBenchConfig(max_tokens=8), [{"role": "user", "content": "hi"}])
    assert payload["ignore_eos"] is True and payload["skip_special_tokens"] is False and payload["stream"] is True
