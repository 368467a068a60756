"""`adadepth bench skinny` on the tiny model: both matmul paths timed in alternating rounds."""
from __future__ import annotations

import json

import pytest
import torch

from adadepth.benchmarks.skinny_linear_bench import SkinnyBenchConfig, run
from adadepth.kernels.cpu_ops import load_cpu_ops


@pytest.mark.parametrize("dtype, batches, kernels", [("bfloat16", "1,6", ("skinny", "paired")),
                                                     ("float32", "1,6", ("paired", "paired"))])
def test_skinny_bench_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch, dtype, batches, kernels):
    ops = load_cpu_ops(str(tmp_path / "ext"))
    if ops is None or getattr(torch, dtype) not in ops.paired_dtypes:
        pytest.skip(f"no C++ compiler or no {dtype} kernel on this CPU (bf16: AVX512-BF16, float32: AVX2)")
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"what is {i} + {i}?"}],
                                           "source": "a"}) + "\n" for i in range(6)))
    out = tmp_path / "skinny.json"
    report = run(SkinnyBenchConfig(model=tiny_llama, dtype=dtype, batches=batches, rounds=2, steps=2,
                                   prompts=str(prompts), out=str(out)))
    assert list(json.loads(out.read_text())["cases"]) == batches.split(",") and out.with_suffix(".png").exists()
    for case in report["cases"].values():
        assert len(case["step_ms_per_round"]["kernels"]) == len(case["step_ms_per_round"]["onednn"]) == 2
        medians = case["step_ms_median"]
        assert case["speedup"] == pytest.approx(medians["onednn"] / medians["kernels"])
    assert tuple(case["kernel"] for case in report["cases"].values()) == kernels
    assert report["dtype"] == f"torch.{dtype}" and report["command"].startswith("adadepth bench skinny")


def test_batches_beyond_the_kernel_are_refused():
    with pytest.raises(ValueError, match=r"1\.\.256"):
        SkinnyBenchConfig(batches="1,257")
    with pytest.raises(ValueError, match="dtype"):
        SkinnyBenchConfig(dtype="float16")
