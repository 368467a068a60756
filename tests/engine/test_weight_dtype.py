"""float32 models with weights rounded to float16 (`weight_dtype`): what auto picks, that every path
multiplies by the same rounded values, and that the decode kernel reads them from float16 copies."""
from __future__ import annotations

import pytest
import torch

from adadepth import LLM, SamplingParams
from adadepth.config import ModelConfig
from adadepth.model.packed_linear import PackedLinear
from output_helpers import chosen_logprobs


def test_weight_dtype_is_validated_and_resolved():
    with pytest.raises(ValueError, match="auto, float32 or float16"):
        ModelConfig(weight_dtype="int8")
    with pytest.raises(ValueError, match="applies to float32 models"):
        ModelConfig(dtype="bfloat16", weight_dtype="float16")
    auto = ModelConfig()
    assert auto.resolved_weight_dtype("float32", half_weight_kernel=True) == "float16"
    assert auto.resolved_weight_dtype("float32", half_weight_kernel=False) == "float32"
    assert auto.resolved_weight_dtype("bfloat16", half_weight_kernel=True) == "bfloat16"
    assert ModelConfig(weight_dtype="float32").resolved_weight_dtype("float32", True) == "float32"
    assert ModelConfig(weight_dtype="float16").resolved_weight_dtype("float32", False) == "float16"
    with pytest.raises(ValueError, match="dtype auto chose bfloat16"):
        ModelConfig(weight_dtype="float16").resolved_weight_dtype("bfloat16", True)


def _linear_weights(llm) -> list[torch.Tensor]:
    return [m.weight for m in llm.engine.model.modules() if isinstance(m, (torch.nn.Linear, PackedLinear))]


def test_float16_weights_decode_as_the_plain_model_on_rounded_weights(tiny_llama, cache_dir):
    """weight_dtype float16: every matmul weight holds float16 values, and greedy decoding with the
    kernels (float16 copies where this CPU has them) equals the kernel-free engine on the same values."""
    opts = dict(dtype="float32", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=128)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    prompts = [f"question {i}: what is {i} times {i}?" for i in range(5)]
    half = LLM(tiny_llama, weight_dtype="float16", **opts)
    assert half.engine.weight_dtype == torch.float16
    weights = _linear_weights(half)
    assert weights and all(w.dtype == torch.float32 and torch.equal(w, w.half().float()) for w in weights)
    copies = {m.paired_weight().dtype for m in half.engine.model.modules()
              if isinstance(m, PackedLinear) and m.paired is not None}
    assert copies <= {torch.float16}          # empty where this CPU has no paired kernel
    plain = LLM(tiny_llama, weight_dtype="float16", cpu_kernels=False, cpu_weight_prepack=False, **opts)
    for a, b in zip(half.generate(prompts, params), plain.generate(prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        torch.testing.assert_close(torch.tensor(chosen_logprobs(a)), torch.tensor(chosen_logprobs(b)),
                                   rtol=1e-4, atol=1e-4)


def test_float32_weights_stay_as_loaded(tiny_llama, cache_dir):
    full = LLM(tiny_llama, dtype="float32", weight_dtype="float32", cache_dir=cache_dir, num_kv_tokens=2048,
               max_model_len=128)
    assert full.engine.weight_dtype == torch.float32
    weights = _linear_weights(full)
    assert any(not torch.equal(w, w.half().float()) for w in weights)
    assert all(m.paired_weight().dtype == torch.float32 for m in full.engine.model.modules()
               if isinstance(m, PackedLinear) and m.paired is not None)
