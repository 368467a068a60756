"""`adadepth bench matmul-rows` on one layer's shapes: both paths timed per row count, their outputs compared."""
from __future__ import annotations

import json

import pytest
import torch

from adadepth.benchmarks.matmul_rows_bench import DEFAULT_SHAPES, MatmulRowsBenchConfig, run
from adadepth.kernels.cpu_ops import load_cpu_ops


def test_matmul_rows_bench_times_both_paths(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    ops = load_cpu_ops(f"{cache_dir}/extensions")
    if ops is None or ops.paired_linear is None:
        pytest.skip("no C++ compiler, or neither AVX512-BF16 nor AVX2 on this CPU: the paired kernel does not exist here")
    dtype = "bfloat16" if torch.bfloat16 in ops.paired_dtypes else "float32"
    out = tmp_path / "matmul_rows.json"
    report = run(MatmulRowsBenchConfig(rows="5,20", num_layers=1, repeats=2, sweeps=1, dtype=dtype, out=str(out)))
    assert json.loads(out.read_text())["benchmark"] == "matmul_rows" and out.with_suffix(".png").exists()
    assert [c["rows"] for c in report["cases"]] == [5, 20]
    flops = 2 * sum(n * k for n, k in DEFAULT_SHAPES)
    for c in report["cases"]:
        assert len(c["ms_per_repeat"]["paired"]) == len(c["ms_per_repeat"]["onednn"]) == 2
        assert c["onednn_over_paired"] == pytest.approx(c["ms_median"]["onednn"] / c["ms_median"]["paired"])
        assert c["gflops"]["paired"] == pytest.approx(c["rows"] * flops / (c["ms_median"]["paired"] * 1e6))
        assert c["max_abs_diff"] < 0.05   # the same product either way, bf16 or float32 outputs
    # 2 or 4 bytes per weight, N*K weights
    assert report["weight_mb"] == pytest.approx(flops / 1e6 * (1 if dtype == "bfloat16" else 2))
    assert report["dtype"] == dtype
    assert report["float16_copy_timed"] == (dtype == "float32" and ops.paired_half_weights)
    if report["float16_copy_timed"]:
        for c in report["cases"]:
            assert c["f16w_max_abs_diff_to_paired"] == 0.0
            assert c["paired_over_paired_f16w"] == pytest.approx(c["ms_median"]["paired"] / c["ms_median"]["paired_f16w"])
    assert report["command"].startswith("adadepth bench matmul-rows")


@pytest.mark.parametrize("kw, message", [({"rows": "0"}, "positive"), ({"rows": ""}, "positive"),
                                         ({"repeats": 0}, ">= 1"), ({"dtype": "float16"}, "dtype")])
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        MatmulRowsBenchConfig(**kw)
