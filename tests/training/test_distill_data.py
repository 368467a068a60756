"""`adadepth distill-data` (teacher answers as a train file) and `adadepth train --train-file`."""
from __future__ import annotations

import json
import os

import pytest

from adadepth import LLM, SamplingParams
from adadepth.cli import main as cli_main
from adadepth.training.data import Split, read_train_file, split_of


def distill(tiny_base, data, cache, out, num_prompts):
    cli_main(["distill-data", "--model", tiny_base, "--data-dir", data, "--cache-dir", cache, "--output", out,
              "--num-prompts", str(num_prompts), "--max-tokens", "6", "--chunk", "3", "--max-model-len", "128"])
    return [json.loads(line) for line in open(out)]


@pytest.fixture(scope="module")
def distilled(tiny_base, fake_data, train_cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("distill") / "teacher.jsonl")
    return out, distill(tiny_base, fake_data, train_cache, out, 5)


def test_answers_are_the_teachers_greedy_continuations(distilled, tiny_base, train_cache):
    _, rows = distilled
    assert len(rows) == 5 and len({r["id"] for r in rows}) == 5
    assert all(split_of(r["messages"][-1]["content"]) is Split.TRAIN for r in rows)
    assert {r["teacher"] for r in rows} == {tiny_base}
    llm = LLM(tiny_base, cache_dir=train_cache, max_model_len=128)
    outs = llm.chat([r["messages"] for r in rows], SamplingParams(max_tokens=6, temperature=0.0))
    assert [r["completion"] for r in rows] == [o.outputs[0].text for o in outs]
    assert [r["finish_reason"] for r in rows] == [o.outputs[0].finish_reason for o in outs]


def test_rerun_appends_only_the_missing_prompts(distilled, tiny_base, fake_data, train_cache, tmp_path):
    path, rows = distilled
    copy = str(tmp_path / "copy.jsonl")
    with open(copy, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:3])
    again = distill(tiny_base, fake_data, train_cache, copy, 5)
    # The same 5 prompts in the same fixed order; the 3 already written are not generated twice.
    assert [r["id"] for r in again] == [r["id"] for r in rows]
    assert again == rows


def test_train_file_checks_its_lines(tmp_path):
    train_prompt = next(f"p{i}" for i in range(1000) if split_of(f"p{i}") is Split.TRAIN)
    heldout_prompt = next(f"p{i}" for i in range(1000) if split_of(f"p{i}") is Split.HELDOUT)
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"prompt": train_prompt, "completion": ""}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": heldout_prompt}], "completion": "x"}) + "\n")
    examples, dropped = read_train_file(str(path))
    # An empty answer is kept (the teacher ended its turn at once); the held-out prompt is not.
    assert [(e.messages[-1]["content"], e.completion) for e in examples] == [(train_prompt, "")] and dropped == 1
    path.write_text(json.dumps({"prompt": train_prompt}) + "\n")
    with pytest.raises(ValueError, match="line 1: a training line needs"):
        read_train_file(str(path))
    path.write_text(json.dumps({"prompt": heldout_prompt, "completion": "x"}) + "\n")
    with pytest.raises(ValueError, match="no training lines"):
        read_train_file(str(path))


def test_train_reads_the_train_file_instead_of_the_shared_data(distilled, tiny_base, fake_data, train_cache, tmp_path):
    path, rows = distilled
    out = str(tmp_path / "art")
    cli_main(["train", "--model", tiny_base, "--data-dir", fake_data, "--cache-dir", train_cache, "--output", out,
              "--train-file", path, "--batch-size", "2", "--max-seq-len", "64", "--max-steps", "2",
              "--layer-order", "early-exit", "--no-progress-bar"])
    meta = json.load(open(os.path.join(out, "adadepth.json")))["train"]
    # The fake shared data holds ~150 train examples; the run saw exactly the file's 5.
    assert meta["train_examples"] == len(rows) == 5
    assert meta["config"]["train"]["train_file"] == path and meta["steps"] == 2
