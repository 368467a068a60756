"""`adadepth bench attention` on small shapes: both routes timed per length and dtype, their outputs compared."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.chunk_attention_bench import ChunkAttentionBenchConfig, run


def test_attention_bench_times_both_routes(tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "attention.json"
    report = run(ChunkAttentionBenchConfig(lengths="8,40", dtypes="float32,bfloat16", num_heads=4, num_kv_heads=2,
                                           head_dim=32, repeats=2, out=str(out)))
    assert json.loads(out.read_text())["cases"].keys() == {"float32", "bfloat16"} and out.with_suffix(".png").exists()
    for name, case in report["cases"].items():
        assert [r["length"] for r in case["rows"]] == [8, 40]
        for r in case["rows"]:
            assert r["pairs"] == r["length"] * (r["length"] + 1) // 2
            assert r["kernel_over_sdpa"] == pytest.approx(r["ms_median"]["paged_kernel"] / r["ms_median"]["sdpa"])
            assert r["max_abs_diff"] < (2e-5 if name == "float32" else 0.05)   # the same attention either way
        assert case["chunk_pairs_limit_in_use"] > 0
    assert report["command"].startswith("adadepth bench attention")


@pytest.mark.parametrize("kw, message", [({"dtypes": "float16"}, "dtypes"), ({"lengths": "0"}, "positive"),
                                         ({"num_heads": 9, "num_kv_heads": 2}, "multiple")])
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        ChunkAttentionBenchConfig(**kw)
