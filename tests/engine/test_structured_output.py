"""Structured outputs (xgrammar) on a tiny random model: whatever the weights, the text obeys."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from adadepth import LLM, SamplingParams
from adadepth.sampling_params import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["a", "bb", "ccc"]},
    },
    "required": ["name", "age", "ok", "tag"],
    "additionalProperties": False,
}
PROMPTS = ["hello world", "the quick brown fox jumps", "what is 2 + 2?", "def add(a, b):"]


@pytest.fixture(scope="module")
def llm(tiny_llama, cache_dir):
    return LLM(tiny_llama, dtype="float32", cache_dir=cache_dir, num_kv_tokens=8192, max_model_len=256,
               max_num_batched_tokens=1024)


def constrained(temperature=0.0, seed=None, depth=None, **kind) -> SamplingParams:
    return SamplingParams(max_tokens=120, temperature=temperature, seed=seed, depth=depth,
                          structured_outputs=StructuredOutputsParams(disable_any_whitespace=True, **kind))


@pytest.mark.parametrize("depth", [1, 2, 3, 4, 5, 6])
def test_json_schema_outputs_validate_at_every_depth(llm, depth):
    params = [constrained(depth=depth, json=SCHEMA),
              constrained(temperature=1.0, seed=depth, depth=depth, json=SCHEMA)]
    for p in params:
        for out in llm.generate(PROMPTS, p):
            completion = out.outputs[0]
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), SCHEMA)


def test_regex_choice_json_object_and_grammar(llm):
    for out in llm.generate(PROMPTS, constrained(regex=r"[0-9]{3}-[a-z]{2}")):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", out.outputs[0].text)
    choices = ("yes", "no", 'say "hi"\\')
    for out in llm.generate(PROMPTS, constrained(temperature=1.0, seed=1, choice=choices)):
        assert out.outputs[0].text in choices
    # A random model writes unbounded strings until max_tokens; the outputs that end are objects.
    ended = [o.outputs[0].text for o in llm.generate(PROMPTS, constrained(json_object=True))
             if o.outputs[0].finish_reason == "stop"]
    assert ended and all(isinstance(json.loads(text), dict) for text in ended)
    for out in llm.generate(PROMPTS, constrained(grammar='root ::= "(" ("x" | "y")+ ")"')):
        assert re.fullmatch(r"\((x|y)+\)", out.outputs[0].text)


def test_free_rows_are_unchanged_by_constrained_neighbours(llm):
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, free)]
    mixed = llm.generate(PROMPTS + PROMPTS, [free] * len(PROMPTS) + [constrained(json=SCHEMA, depth=3)] * len(PROMPTS))
    assert [list(o.outputs[0].token_ids) for o in mixed[: len(PROMPTS)]] == alone
    for out in mixed[len(PROMPTS):]:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)


@pytest.mark.parametrize("kind", [{"json": {"type": "nonsense"}}, {"regex": "(("}, {"grammar": "root ::= "},
                                  {"json": "{not json"}])
def test_invalid_constraints_are_refused_before_admission(llm, kind):
    with pytest.raises(ValueError, match="invalid .* for structured outputs") as info:
        llm.engine.validate([1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(**kind)))
    assert ".cc:" not in str(info.value), "the C++ source location is not the client's business"


@pytest.mark.parametrize("kind", [{}, {"json": SCHEMA, "regex": "a"}, {"choice": []}, {"choice": "ab"},
                                  {"json_object": False}])
def test_exactly_one_constraint(kind):
    with pytest.raises(ValueError):
        StructuredOutputsParams(**kind)
