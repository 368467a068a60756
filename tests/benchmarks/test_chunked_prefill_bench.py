"""`adadepth bench chunked` on the tiny model: every long prompt is served in each mode, and in
chunks a prompt takes at least as many steps as it has chunks."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.chunked_prefill_bench import ChunkedPrefillConfig, run


def test_run_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question number {i} " * 3}],
                                           "source": "s"}) + "\n" for i in range(12)))
    out = tmp_path / "c.json"
    report = run(ChunkedPrefillConfig(model=tiny_llama, dtype="float32", budgets="0,4", streams=3, long_prompts=2,
                                      long_prompt_tokens=40, arrival_every=3, repeats=1, prompts=str(prompts),
                                      out=str(out)))
    whole, chunked = report["results"]
    assert (whole["prefill_chunk_tokens"], chunked["prefill_chunk_tokens"]) == (0, 4)
    # Whole: each long prompt's first token comes from the step it arrives in (arrivals every 3 steps).
    assert whole["steps"] == 3 * 2
    # Chunks of 4: 40 tokens need at least 9 steps (the last token may ride as a decode row).
    assert chunked["steps"] >= 3 + 9
    for r in report["results"]:
        assert r["stream_itl_ms"]["p50"] <= r["stream_itl_ms"]["p99"] <= r["stream_itl_ms"]["max"]
    saved = json.loads(out.read_text())
    assert saved["machine"]["isa"] and saved["command"].startswith("adadepth bench chunked")
    from PIL import Image

    assert Image.open(out.with_suffix(".png")).size[0] > 500


def test_config_rejects_bad_budgets():
    with pytest.raises(ValueError):
        ChunkedPrefillConfig(budgets="0,-1")
