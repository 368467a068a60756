"""`adadepth bench step` on the tiny model: every case timed and profiled, rows at their depths."""
from __future__ import annotations

import json

import pytest
import torch

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
    assert one["loop_ab"] is None  # float32: no C++ layer loop to compare
    assert not out.with_suffix(".png").exists()


def test_loop_ab_alternates_the_two_layer_loops(tiny_llama, cache_dir, tmp_path, monkeypatch):
    from adadepth.kernels.cpu_ops import load_cpu_ops

    ops = load_cpu_ops(str(tmp_path / "ext"))
    if ops is None or ops.decode_layers is None:
        pytest.skip("no C++ compiler, or neither AVX512-BF16 nor AVX2 on this CPU: no C++ layer loop")
    dtype = "bfloat16" if torch.bfloat16 in ops.paired_dtypes else "float32"  # what the loop takes here
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}]}) + "\n"
                               for i in range(4)))
    report = run(StepProfileConfig(model=tiny_llama, dtype=dtype, cases="batch1", steps=3, profiled_steps=1,
                                   loop_ab_rounds=3, prompts=str(prompts), out=str(tmp_path / "step.json")))
    ab = report["cases"]["batch1"]["loop_ab"]
    assert len(ab["cpp_step_ms"]) == len(ab["python_step_ms"]) == 3
    assert ab["python_over_cpp"] == [p / c for p, c in zip(ab["python_step_ms"], ab["cpp_step_ms"])]
    assert ab["python_over_cpp_median"] == sorted(ab["python_over_cpp"])[1]
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_cases_are_refused():
    with pytest.raises(ValueError, match="unknown cases"):
        StepProfileConfig(cases="batch2")
    with pytest.raises(ValueError, match="loop_ab_rounds"):
        StepProfileConfig(loop_ab_rounds=-1)
