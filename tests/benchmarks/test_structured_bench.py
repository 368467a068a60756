"""`adadepth bench structured` on the tiny model: validity is checked by strict JSON and the
schema, and the cost comparison times the steps where every row runs."""
from __future__ import annotations

import json

from adadepth.benchmarks.structured_bench import SCHEMAS, StructuredBenchConfig, check, json_prompt, run


def test_check_is_strict_json_and_schema():
    schema = SCHEMAS[0]
    assert check('{"answer": "4", "steps": 2}', schema) is None
    assert check('{"answer": "4", "steps": 21}', schema).startswith("schema")
    assert check('{"answer": "a\x00b", "steps": 2}', schema).startswith("not JSON")  # control characters
    assert check('{"answer": "4", "steps": 2', schema).startswith("not JSON")
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    asked = json_prompt(messages, schema)
    assert asked[0] == messages[0] and asked[1]["content"].startswith("q\n") and json.dumps(schema) in asked[1]["content"]
    assert messages[1]["content"] == "q"


def test_run_on_the_tiny_model(tiny_llama, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ADADEPTH_CACHE_DIR", cache_dir)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hi {i}"}], "source": "s"}) + "\n"
                               for i in range(3)))
    report = run(StructuredBenchConfig(model=tiny_llama, dtype="float32", prompts=str(prompts), max_prompts=3,
                                       depths="3,6", max_tokens=40, cost_batch=4, cost_tokens=6, cost_repeats=2,
                                       out=str(tmp_path / "s.json")))
    assert [v["depth"] for v in report["validity"]] == [3, 6]
    for v in report["validity"]:
        assert v["requests"] == 3 and v["valid"] + len([f for f in report["failures"] if f["depth"] == v["depth"]]) == 3
    # Free rows all run to cost_tokens: the prefill samples token 1, then 5 decode steps of 4 rows, twice.
    assert report["cost"]["steps_measured"]["free"] == 2 * 5
    assert json.loads((tmp_path / "s.json").read_text())["backend"] == "xgrammar"
