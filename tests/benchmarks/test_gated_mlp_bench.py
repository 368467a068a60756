"""`adadepth bench gated-mlp` on the tiny model: both ways timed in alternating rounds, and each way
really ran (the fused one through oneDNN's epilogues, the separate one through the op)."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.gated_mlp_bench import GatedMlpBenchConfig, run
from adadepth.model.packed_linear import PackedLinear, onednn_available


@pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
def test_gated_mlp_bench_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}],
                                           "source": "a"}) + "\n" for i in range(6)))
    fused_calls = []
    halves = PackedLinear.packed_halves
    monkeypatch.setattr(PackedLinear, "packed_halves", lambda self: fused_calls.append(1) or halves(self))
    out = tmp_path / "gated.json"
    report = run(GatedMlpBenchConfig(model=tiny_llama, dtype="float32", prompts_per_step="2", rounds=2, steps=1,
                                     mlp_rows="300", mlp_rounds=2, prompts=str(prompts), out=str(out)))
    saved = json.loads(out.read_text())
    assert saved["cases"].keys() == {"2"} and saved["ops"].keys() == {"300"} and out.with_suffix(".png").exists()
    case, op = report["cases"]["2"], report["ops"]["300"]
    assert len(case["step_ms_per_round"]["fused"]) == len(case["step_ms_per_round"]["separate"]) == 2
    assert case["speedup"] == pytest.approx(case["step_ms_median"]["separate"] / case["step_ms_median"]["fused"])
    assert len(op["ms_per_round"]["fused"]) == len(op["ms_per_round"]["separate"]) == 2
    assert case["mean_prompt_tokens_per_step"] > 2  # two prompts of several tokens each
    assert fused_calls, "the fused way never reached oneDNN's epilogues"
    assert report["command"].startswith("adadepth bench gated-mlp")


def test_config_validation():
    with pytest.raises(ValueError):
        GatedMlpBenchConfig(prompts_per_step="0")
    with pytest.raises(ValueError):
        GatedMlpBenchConfig(mlp_rounds=0)
