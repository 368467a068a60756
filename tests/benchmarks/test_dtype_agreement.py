"""`adadepth bench dtype` on the tiny model: float32 against itself agrees at every continuation
position (so the positions line up with the tokens they predict), bf16 is scored on the same ones."""
from __future__ import annotations

import json

import pytest

from adadepth.benchmarks.dtype_agreement import DtypeAgreementConfig, run


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello {i} world"}],
                                        "source": "s"}) + "\n" for i in range(5)))
    return str(path)


def test_float32_against_itself_agrees_everywhere(tiny_llama, cache_dir, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    report = run(DtypeAgreementConfig(model=tiny_llama, dtype="float32", weight_dtype="float32", prompts=prompts,
                                      max_tokens=6, out=str(tmp_path / "a.json")))
    assert report["compared"] == "float32, weights float32 against float32, weights float32"
    assert report["num_prompts"] == 5 and report["teacher_forced_positions"] > 5
    assert report["teacher_forced_agreement"] == 1.0 and report["identical_free_running_continuations"] == 1.0


def test_bf16_is_scored_on_the_same_positions(tiny_llama, cache_dir, prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    ref = run(DtypeAgreementConfig(model=tiny_llama, dtype="float32", prompts=prompts, max_tokens=6,
                                   out=str(tmp_path / "a.json")))
    low = run(DtypeAgreementConfig(model=tiny_llama, dtype="bfloat16", prompts=prompts, max_tokens=6,
                                   out=str(tmp_path / "b.json")))
    assert low["teacher_forced_positions"] == ref["teacher_forced_positions"]
    assert json.loads((tmp_path / "b.json").read_text())["config"]["dtype"] == "bfloat16"
    half = run(DtypeAgreementConfig(model=tiny_llama, dtype="float32", weight_dtype="float16", prompts=prompts,
                                    max_tokens=6, out=str(tmp_path / "c.json")))
    assert half["teacher_forced_positions"] == ref["teacher_forced_positions"]
    assert half["compared"].startswith("float32, weights float16 against")


def test_dtype_is_validated():
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        DtypeAgreementConfig(dtype="int8")
    with pytest.raises(ValueError, match="with dtype float32"):
        DtypeAgreementConfig(dtype="bfloat16", weight_dtype="float16")
