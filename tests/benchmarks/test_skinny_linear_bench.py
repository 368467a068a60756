"""`adadepth bench skinny` on the tiny model: both matmul paths timed in alternating rounds."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.skinny_linear_bench import SkinnyBenchConfig, run
from adadepth.kernels.cpu_ops import load_cpu_ops


def test_skinny_bench_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    ops = load_cpu_ops(str(tmp_path / "ext"))
    if ops is None or ops.skinny_linear is None or ops.paired_linear is None:
        pytest.skip("no C++ compiler or no AVX512-BF16 on this CPU")
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}],
                                           "source": "a"}) + "\n" for i in range(6)))
    out = tmp_path / "skinny.json"
    report = run(SkinnyBenchConfig(model=tiny_llama, batches="1,6", rounds=2, steps=2, prompts=str(prompts),
                                   out=str(out)))
    assert json.loads(out.read_text())["cases"].keys() == {"1", "6"} and out.with_suffix(".png").exists()
    for case in report["cases"].values():
        assert len(case["step_ms_per_round"]["kernels"]) == len(case["step_ms_per_round"]["onednn"]) == 2
        medians = case["step_ms_median"]
        assert case["speedup"] == pytest.approx(medians["onednn"] / medians["kernels"])
    assert report["cases"]["1"]["kernel"] == "skinny" and report["cases"]["6"]["kernel"] == "paired"
    assert report["dtype"] == "torch.bfloat16" and report["command"].startswith("adadepth bench skinny")


def test_batches_beyond_the_kernel_are_refused():
    with pytest.raises(ValueError, match=r"1\.\.256"):
        SkinnyBenchConfig(batches="1,257")
