"""The bf16 matmul kernel for a few rows against its reference (F.linear), and inside the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adadepth import LLM, SamplingParams
from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.model.packed_linear import PackedLinear
from output_helpers import chosen_logprobs


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    ops = load_cpu_ops(str(tmp_path_factory.mktemp("ext")))
    if ops is None or ops.skinny_linear is None:
        pytest.skip("no C++ compiler or no AVX512-BF16 on this CPU: the model keeps oneDNN for every matmul")
    return ops.skinny_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k,n,bias", [(64, 16, False), (576, 960, True), (1536, 576, False), (96, 48, True)])
def test_skinny_linear_equals_f_linear(kernel, rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    got = kernel(x, w, b)
    # The reference sums in float32 too (in another order): the results may differ by one bf16
    # rounding step (2^-8 relative), never more.
    want = (x.float() @ w.float().T + (b.float() if bias else 0)).bfloat16()
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=2 ** -7, atol=1e-3)


def test_skinny_linear_refuses_what_it_does_not_take(kernel):
    x = torch.randn(5, 64).bfloat16()
    with pytest.raises(RuntimeError, match="1..4 rows"):
        kernel(x, torch.randn(16, 64).bfloat16(), None)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel(x[:1].float(), torch.randn(16, 64), None)


def test_model_routes_small_bf16_products_to_the_kernel(kernel, tiny_llama, cache_dir, monkeypatch):
    """Decode at batch <= 4 in bf16 runs the packed matmuls through the kernel (prefill does not),
    and generates what oneDNN alone does, within bf16 rounding."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    opts = dict(dtype="bfloat16", cache_dir=cache_dir, num_kv_tokens=1024, max_model_len=128, max_num_batched_tokens=256)
    fast = LLM(tiny_llama, **opts)
    fast.engine.model.fused_decode = None  # the Python layer loop, whose matmul calls the spy below sees
    linears = [m for m in fast.engine.model.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.skinny is not None for m in linears if m.in_features % 32 == 0 and m.out_features % 16 == 0)
    rows_seen = []
    original = linears[0].skinny

    def counting(x, w, b):
        rows_seen.append(x.shape[0])
        return original(x, w, b)

    for m in linears:
        if m.skinny is not None:
            m.skinny = counting
    prompts = ["the quick brown fox jumps over the lazy dog", "hello world"]
    got = fast.generate(prompts, params)
    assert rows_seen and max(rows_seen) <= 2  # the two decode rows; the prompts' rows went to oneDNN
    plain = LLM(tiny_llama, **opts)
    for m in plain.engine.model.modules():
        if isinstance(m, PackedLinear):
            m.use_skinny(None)
    want = plain.generate(prompts, params)
    for a, b in zip(got, want):
        lp_a = torch.tensor(chosen_logprobs(a))
        lp_b = torch.tensor(chosen_logprobs(b))
        assert a.token_ids[:2] == b.token_ids[:2]
        torch.testing.assert_close(lp_a[:2], lp_b[:2], rtol=0.05, atol=0.05)
