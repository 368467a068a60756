"""The serving comparison's summary: repeats merged, vLLM's best dtype kept per depth and
concurrency, the ratios the targets name, the weight-read bound, and the plot."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.serve_comparison import format_table, plot, summarise, weight_bytes_per_token


def level(c: int, tok_s: float, itl: float = 10.0) -> dict:
    stats = lambda v: {"mean": v, "p50": v, "p90": v, "p99": 2 * v}  # noqa: E731
    return {"concurrency": c, "num_requests": 8, "completed": 8, "failed": 0, "output_throughput_tok_s": tok_s,
            "ttft_ms": stats(100.0), "itl_ms": stats(itl), "tpot_ms": stats(itl), "e2e_latency_ms": stats(1000.0)}


def write_runs(folder, label: str, per_repeat: list[dict[int, float]]) -> None:
    for r, figures in enumerate(per_repeat, 1):
        report = {"label": label, "started_at": f"r{r}", "results": [level(c, v) for c, v in figures.items()]}
        (folder / f"{label}_r{r}.json").write_text(json.dumps(report))


@pytest.fixture
def runs(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_runs(raw, "adadepth_d30", [{1: 30, 16: 300}, {1: 36, 16: 330}, {1: 33, 16: 270}])   # medians 33 / 300
    write_runs(raw, "vllm_bfloat16_d30", [{1: 40, 16: 280}, {1: 44, 16: 290}, {1: 42, 16: 285}])  # 42 / 285
    write_runs(raw, "vllm_float32_d30", [{1: 20, 16: 320}, {1: 22, 16: 310}, {1: 21, 16: 300}])   # 21 / 310
    write_runs(raw, "adadepth_d21", [{1: 45, 16: 420}, {1: 47, 16: 400}, {1: 46, 16: 410}])       # 46 / 410
    write_runs(raw, "vllm_bfloat16_d21", [{1: 50, 16: 400}, {1: 60, 16: 420}, {1: 55, 16: 380}])  # 55 / 400
    (tmp_path / "vllm_client_adadepth_d30.json").write_text(json.dumps(
        {"completed": 32, "output_throughput": 315.0, "max_concurrency": 16, "num_prompts": 32}))
    return tmp_path


def test_ratios_use_medians_and_vllms_best_dtype(runs):
    meta = {"machine": {"cpu": "test cpu", "cpu_count": 2}, "read_bandwidth_gb_s": 30.0, "weight_bytes_per_token": 3e8}
    report = summarise(runs, [30, 21], meta)
    rows = {(r["depth"], r["concurrency"]): r for r in report["comparison"]}
    full1, full16, d21_16 = rows[(30, 1)], rows[(30, 16)], rows[(21, 16)]
    assert full1["adadepth"]["output_throughput_tok_s"] == {"median": 33, "min": 30, "max": 36}
    # c=1: bf16 is vLLM's best (42 > 21); c=16: fp32 is (310 > 285).
    assert full1["vllm_best"]["run"] == "vllm_bfloat16_d30" and full16["vllm_best"]["run"] == "vllm_float32_d30"
    assert full1["ratio_vs_vllm_same_layers"] == pytest.approx(33 / 42)
    assert full16["ratio_vs_vllm_same_layers"] == pytest.approx(300 / 310)
    assert d21_16["ratio_vs_vllm_same_layers"] == pytest.approx(410 / 400)
    assert d21_16["ratio_vs_vllm_full_depth"] == pytest.approx(410 / 310)
    assert "ratio_vs_vllm_full_depth" not in full16
    assert report["batch1_weight_read_bound_tok_s"] == pytest.approx(100.0)
    assert full1["fraction_of_batch1_weight_read_bound"] == pytest.approx(0.33)
    assert "fraction_of_batch1_weight_read_bound" not in full16
    check = report["vllm_client_cross_check"]["adadepth_d30"]
    assert check["ratio_vllm_client_to_ours"] == pytest.approx(315 / 300)
    table = format_table(report)
    assert "0.79" in table and "315.0 vs 300.0" in table


def test_plot_is_drawn(runs, tmp_path):
    report = summarise(runs, [30, 21], {"machine": {"cpu": "test cpu", "cpu_count": 2}})
    path = tmp_path / "cmp.png"
    plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_bytes_count_layers_and_a_tied_head(tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.0.mlp.down_proj.weight": torch.zeros(4, 6),
               "model.norm.weight": torch.zeros(4)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True, "vocab_size": 10, "hidden_size": 4}))
    assert weight_bytes_per_token(str(tmp_path), 2) == (24 + 4 + 40) * 2


def test_batch1_bound_uses_the_bandwidth_measured_before_each_repeat(runs):
    # Repeats 1-3 ran c=1 at 30, 36, 33 tok/s; the bandwidth just before each: 30, 60, 33 GB/s.
    for repeat, gb_s in ((1, 30.0), (2, 60.0), (3, 33.0)):
        (runs / f"read_bandwidth_r{repeat}.txt").write_text(f"{gb_s}\n")
    meta = {"machine": {"cpu": "test cpu", "cpu_count": 2}, "read_bandwidth_gb_s": 33.0, "weight_bytes_per_token": 3e8}
    report = summarise(runs, [30, 21], meta)
    full1 = next(r for r in report["comparison"] if (r["depth"], r["concurrency"]) == (30, 1))
    # Bounds 100, 200, 110 tok/s: fractions 0.30, 0.18, 0.30 -> median 0.30 (the run-wide median
    # bandwidth would give 33 / 110).
    fractions = [f["fraction"] for f in full1["batch1_bound_per_repeat"]]
    assert fractions == pytest.approx([0.30, 0.18, 0.30])
    assert full1["fraction_of_batch1_weight_read_bound"] == pytest.approx(0.30)
    assert "repeat 2: 36.0 tok/s of 200.0 (60.0 GB/s just before) = 18%" in format_table(report)
