"""`adadepth bench step` on the tiny model: every case timed and profiled, rows at their depths."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.step_profile import StepProfileConfig, run


def test_step_profile_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}],
                                           "source": "a" if i % 2 else "b"}) + "\n" for i in range(20)))
    out = tmp_path / "step.json"
    report = run(StepProfileConfig(model=tiny_llama, dtype="float32", cases="batch1,mixed16", steps=3,
                                   profiled_steps=1, prompts=str(prompts), out=str(out)))
    assert json.loads(out.read_text())["cases"].keys() == {"batch1", "mixed16"}
    one, mixed = report["cases"]["batch1"], report["cases"]["mixed16"]
    assert one["batch"] == 1 and mixed["batch"] == 16
    assert one["depths"] == [6]
    assert mixed["depths"] == [6, 5, 4] and mixed["mean_depth"] == (6 + 5 + 4 + 4) / 4  # 1.0/0.8/0.7/0.6 of 6
    for case in (one, mixed):
        assert case["step_ms"]["min"] <= case["step_ms"]["median"] <= case["step_ms"]["max"]
        assert case["decode_tok_s"] == pytest.approx(case["batch"] / case["step_ms"]["median"] * 1000)
        assert 0 < sum(op["share"] for op in case["ops"]) <= 1 + 1e-9
        assert any("linear" in op["op"] or "addmm" in op["op"] or "mm" in op["op"] for op in case["ops"])
    assert report["dtype"] == "torch.float32" and report["machine"]["isa"] is not None


def test_unknown_cases_are_refused():
    with pytest.raises(ValueError, match="unknown cases"):
        StepProfileConfig(cases="batch2")
