"""`adadepth bench decode-attention` on small cases: cold and warm sweeps timed, bytes counted right."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.decode_attention_bench import DecodeAttentionBenchConfig, run


@pytest.mark.parametrize("dtype, width", [("float32", 4), ("bfloat16", 2)])
def test_decode_attention_bench_reports_read_speed(tmp_path, monkeypatch, cache_dir, dtype, width):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    out = tmp_path / "decode_attention.json"
    report = run(DecodeAttentionBenchConfig(cases="2x20,3x40", dtype=dtype, num_layers=2, repeats=2, label="t",
                                            out=str(out)))
    assert json.loads(out.read_text())["label"] == "t" and report["dtype"] == dtype
    assert [(c["rows"], c["context"]) for c in report["cases"]] == [(2, 20), (3, 40)]
    for c in report["cases"]:
        # 2 layers x rows x context x 3 kv heads x 64 dims x (K and V), `width` bytes each
        assert c["kv_mb"] * 1e6 == 2 * c["rows"] * c["context"] * 3 * 64 * 2 * width
        assert c["cold_gb_s"] == pytest.approx(c["kv_mb"] / c["cold_ms"])
        assert c["warm_gb_s"] == pytest.approx(c["kv_mb"] / c["warm_ms"])
    assert report["command"].startswith("adadepth bench decode-attention")


@pytest.mark.parametrize("kw, message", [({"cases": "16"}, "16x170"), ({"cases": "0x5"}, "positive"),
                                         ({"cases": "axb"}, "16x170"), ({"dtype": "float16"}, "dtype"),
                                         ({"repeats": 0}, ">= 1")])
def test_bad_configs_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        DecodeAttentionBenchConfig(**kw)
