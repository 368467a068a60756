"""Slow: the real default model (SmolLM2-135M-Instruct) against transformers, token for token."""
from __future__ import annotations

import json
import os

import pytest
import torch

from adadepth import LLM, SamplingParams

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data")
pytestmark = pytest.mark.slow


def real_prompts(n: int) -> list[list[dict]]:
    """Chat conversations from GSM8K and the T0 sample (both in ../shared/data)."""
    with open(os.path.join(DATA, "gsm8k_train.jsonl")) as f:
        gsm = [json.loads(line)["question"] for _, line in zip(range(n // 2), f)]
    t0_dir = os.path.join(DATA, "t0")
    t0 = []
    for name in sorted(os.listdir(t0_dir))[: n - len(gsm)]:
        with open(os.path.join(t0_dir, name)) as f:
            t0.append(json.loads(f.readline())["prompt"][:600])
    return [[{"role": "user", "content": p}] for p in gsm + t0]


@pytest.fixture(scope="module")
def base_llm():
    # float64 on both sides: in fp32 the fused q/k/v and gate/up matmuls round differently from
    # transformers' separate ones (~1e-6), which can flip a near-tie argmax; float64 compares the
    # computation itself.
    return LLM("default-base", num_kv_tokens=16384, dtype="float64")


def test_full_depth_equals_transformers_generate_on_20_real_prompts(base_llm):
    from transformers import AutoModelForCausalLM

    from adadepth.model.loader import resolve_model

    resolved = resolve_model("default-base", base_llm.engine.config.model.cache_dir)
    hf = AutoModelForCausalLM.from_pretrained(resolved.checkpoint_dir, dtype=torch.float64).eval()
    tok = base_llm.tokenizer
    conversations = real_prompts(20)
    assert len(conversations) == 20
    # min_tokens, like transformers' min_new_tokens, keeps EOS from being chosen (ignore_eos alone
    # only keeps generating after one: the model may still pick EOS, which generate would not).
    outs = base_llm.chat(conversations, SamplingParams(max_tokens=24, min_tokens=24, temperature=0))
    assert base_llm.num_layers == 30
    for conv, out in zip(conversations, outs):
        ids = tok.apply_chat_template(conv, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            ref = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        assert out.token_ids == ref, conv[0]["content"][:60]
        assert out.depth == 30


def test_default_artifact_loads_and_runs_every_depth(base_llm):
    llm = LLM("default", num_kv_tokens=4096)
    assert llm.engine.model_name == "default"
    assert llm.engine.plan.source.startswith("calibrated")
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    full = llm.chat(conv, SamplingParams(max_tokens=12, temperature=0, depth=30))[0]
    assert "Paris" in full.text
    for depth in (15, 21, 24, 27):
        out = llm.chat(conv, SamplingParams(max_tokens=12, temperature=0, depth=depth))[0]
        assert out.depth == depth and out.token_ids
