"""`adadepth bench soak` for 60 s against a real server process on the tiny model: nothing lost,
no KV block left, every malformed request a 4xx with an error body, a clean exit on SIGTERM."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.soak import SoakConfig, run


def test_soak_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    out = tmp_path / "soak.json"
    report = run(SoakConfig(model=tiny_llama, duration=60, concurrency=12, max_tokens=24, rss_interval=1.0,
                            server_args="--dtype float32 --max-model-len 256 --num-kv-tokens 8192 --max-waiting 64",
                            out=str(out)))
    outcomes = report["outcomes"]
    assert report["lost"] == 0, report["lost_examples"]
    assert not report["kv_blocks_leaked"] and report["after_load"]["healthy"]
    assert outcomes.get("complete", 0) > 100 and outcomes.get("malformed_ok", 0) > 10
    assert outcomes.get("disconnected", 0) > 0  # some streams did hang up, and still nothing leaked
    assert report["server_exit_code_after_sigterm"] == 0
    assert len(report["rss_mb"]) > 30 and json.loads(out.read_text())["requests"] == report["requests"]
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_soak_targets_only_loopback():
    with pytest.raises(ValueError, match="loopback"):
        SoakConfig(url="http://10.0.0.5:8000")
