"""The C++ layer loop for decode steps (fused_decode.py, kernels/decode_layers_cpu.cpp) against the
Python loop it replaces: bit for bit, which steps it takes, and that it follows weight changes."""
from __future__ import annotations

import pytest
import torch

from adadepth import LLM, SamplingParams
from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.model.packed_linear import PackedLinear
from output_helpers import chosen_logprobs

# No prefix cache: each loop runs the same prompts in one engine, and must compute them, not find
# the other loop's keys and values.
OPTS = dict(num_kv_tokens=4096, max_model_len=256, max_num_batched_tokens=512,
            enable_prefix_caching=False)


@pytest.fixture(scope="module")
def cpu_ops(tmp_path_factory):
    ops = load_cpu_ops(str(tmp_path_factory.mktemp("ext")))
    if ops is None or ops.decode_layers is None:
        pytest.skip("no C++ compiler, or neither AVX512-BF16 nor AVX2 on this CPU: decode steps keep the Python loop")
    return ops


@pytest.fixture(params=["bfloat16", "float32"])
def dtype(request, cpu_ops) -> str:
    """The dtypes the C++ loop serves on this CPU: bf16 with AVX512-BF16 (skinny, paired and oneDNN
    matmuls), float32 with AVX2 (paired and oneDNN)."""
    if getattr(torch, request.param) not in cpu_ops.paired_dtypes:
        pytest.skip(f"no {request.param} matmul kernel on this CPU (bf16 needs AVX512-BF16, float32 AVX2 and FMA)")
    return request.param


def _prompts(n: int) -> list[str]:
    # Short: every prompt's rows fit the paged kernel's limit for this head size (32 tokens), so a
    # whole batch prefills in one decode-shaped step and then decodes together.
    return [f"r{i} apples" + " pears" * (i % 3) for i in range(n)]


def _run(llm: LLM, fused, prompts, params):
    """Generate with the C++ loop (fused) or the Python loop (None); returns the outputs, the rows of
    each C++ call and the number of forward steps."""
    calls, steps = [], []
    model = llm.engine.model
    if fused is not None:
        op, covers = fused.op, fused.covers
        fused.op = lambda *args: calls.append(args[0].shape[0]) or op(*args)
        fused.covers = lambda h, batch: steps.append(1) or covers(h, batch)
    model.fused_decode = fused
    try:
        return llm.generate(prompts, params), calls, len(steps)
    finally:
        if fused is not None:
            fused.op, fused.covers = op, covers


@pytest.mark.parametrize("checkpoint, batch, kv_group_layers, paired_max_rows", [
    ("tiny_llama", 1, 3, None),   # skinny matmuls (float32: paired)
    ("tiny_llama", 3, 1, None),   # skinny, one layer per page group
    ("tiny_llama", 7, 2, None),   # paired matmuls
    ("tiny_qwen2", 6, 3, None),   # q/k/v biases
    ("tiny_llama", 52, 3, None),  # paired, several row tiles
    ("tiny_llama", 52, 3, 32),    # oneDNN matmuls (rows past paired_max_rows)
    ("tiny_qwen2", 50, 2, 32),    # oneDNN with biases
])
def test_same_tokens_and_logprobs_bit_for_bit(dtype, request, monkeypatch, cache_dir, checkpoint, batch,
                                              kv_group_layers, paired_max_rows):
    if paired_max_rows is not None:
        monkeypatch.setattr(PackedLinear, "paired_max_rows", paired_max_rows)
    llm = LLM(request.getfixturevalue(checkpoint), cache_dir=cache_dir, kv_group_layers=kv_group_layers, dtype=dtype,
              **OPTS)
    fused = llm.engine.model.fused_decode
    assert fused is not None
    num_layers = llm.engine.model.num_layers
    # Mixed depths: every layer's active rows differ from the next one's somewhere.
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=0,
                             depth=max(1, num_layers - i % num_layers)) for i in range(batch)]
    got, calls, steps = _run(llm, fused, _prompts(batch), params)
    want, _, _ = _run(llm, None, _prompts(batch), params)
    # Every step took the C++ loop, the prompts' too (their tokens are rows of decode-shaped steps),
    # and the whole batch decoded together.
    assert len(calls) == steps >= 10 and calls.count(batch) >= 5
    for a, b in zip(got, want):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert chosen_logprobs(a) == chosen_logprobs(b)


def test_chunked_prompts_beside_decode_rows_and_the_steps_it_leaves(dtype, tiny_llama, cache_dir):
    """A prompt arriving while others decode rides their steps in chunks and gets the Python loop's
    tokens: the C++ loop takes the steps whose chunks go through the paged kernel, and leaves to
    Python those with a chunk past its limit (SDPA's)."""
    llm = LLM(tiny_llama, cache_dir=cache_dir, prefill_chunk_tokens=16, dtype=dtype, **OPTS)
    fused = llm.engine.model.fused_decode
    engine = llm.engine
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)

    decisions = []  # (covered, chunk pairs past the paged kernel's limit)
    covers = fused.covers
    limit = engine.model.layers[0].ops.chunk_pairs_limit(getattr(torch, dtype), fused.head_dim,
                                                         fused.num_heads // fused.num_kv_heads)

    def spied_covers(h, batch):
        past = [c for c in batch.chunks or () if c[1] * c[2] + c[1] * (c[1] + 1) // 2 > limit]
        decisions.append((covers(h, batch), bool(past)))
        return decisions[-1][0]

    def run(with_fused) -> tuple[dict, list[int]]:
        calls = []
        if with_fused is not None:
            op = fused.op
            fused.op = lambda *args: calls.append(args[0].shape[0]) or op(*args)
            fused.covers = spied_covers
        engine.model.fused_decode = with_fused
        outputs = {}
        try:
            for i, prompt in enumerate(_prompts(2)):
                engine.add_request(f"short-{i}", prompt, params)
            for _ in range(3):
                engine.step()
            engine.add_request("long", "a long question " * 20, params)  # ~60 tokens: chunks of 16
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        outputs[out.request_id] = out
        finally:
            if with_fused is not None:
                fused.op, fused.covers = op, covers
        return outputs, calls

    got, calls = run(fused)
    want, _ = run(None)
    assert sorted(got) == sorted(want) == ["long", "short-0", "short-1"]
    for rid in got:
        assert got[rid].outputs[0].token_ids == want[rid].outputs[0].token_ids
        assert chosen_logprobs(got[rid]) == chosen_logprobs(want[rid])
    assert max(calls) > 3  # steps of 2 decode rows + a 16-token chunk went through the C++ loop
    # Every decode-shaped step was taken but those with a chunk past the limit, and there were some.
    assert (False, True) in decisions and all(covered != past for covered, past in decisions)


def test_follows_a_weight_changed_after_load(dtype, tiny_llama, cache_dir):
    """The k-pair and oneDNN weight copies are derived data: changing a weight in place must reach the
    C++ loop."""
    llm = LLM(tiny_llama, cache_dir=cache_dir, dtype=dtype, **OPTS)
    fused = llm.engine.model.fused_decode
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)] * 6
    before, _, _ = _run(llm, fused, _prompts(6), params)
    with torch.inference_mode():
        for layer in llm.engine.model.layers:
            layer.gate_up_proj.weight.mul_(-1.5)
            layer.o_proj.weight.mul_(0.5)
    got, calls, _ = _run(llm, fused, _prompts(6), params)
    want, _, _ = _run(llm, None, _prompts(6), params)
    assert calls
    assert [chosen_logprobs(o) for o in got] == [chosen_logprobs(o) for o in want]
    assert [chosen_logprobs(o) for o in got] != [chosen_logprobs(o) for o in before]
