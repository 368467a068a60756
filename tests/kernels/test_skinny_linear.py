"""The matmul kernel for a few rows (bf16 with AVX512-BF16, float32 with AVX2) against its reference
(F.linear), and inside the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adadepth import LLM, SamplingParams
from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.model.packed_linear import PackedLinear
from output_helpers import chosen_logprobs


@pytest.fixture(scope="module")
def cpu_ops(tmp_path_factory):
    ops = load_cpu_ops(str(tmp_path_factory.mktemp("ext")))
    if ops is None or ops.skinny_linear is None:
        pytest.skip("no C++ compiler, or neither AVX512-BF16 nor AVX2 on this CPU: the model keeps oneDNN")
    return ops


@pytest.fixture(params=["bfloat16", "float32"])
def dtype(request, cpu_ops) -> torch.dtype:
    if getattr(torch, request.param) not in cpu_ops.skinny_dtypes:
        pytest.skip(f"no {request.param} kernel on this CPU (bf16 needs AVX512-BF16, float32 AVX2 and FMA)")
    return getattr(torch, request.param)


@pytest.fixture
def kernel(cpu_ops):
    return cpu_ops.skinny_linear


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("k,n,bias", [(64, 16, False), (576, 960, True), (1536, 576, False), (96, 48, True)])
def test_skinny_linear_equals_f_linear(kernel, dtype, rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    got = kernel(x, w, b)
    assert got.shape == (rows, n) and got.dtype == dtype
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    if dtype == torch.bfloat16:
        # The reference sums in float32 too (in another order): the results may differ by one bf16
        # rounding step (2^-8 relative), never more.
        want = (x.float() @ w.float().T + (b.float() if bias else 0)).bfloat16()
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=2 ** -7, atol=1e-3)
    else:
        # float32 sums of k products of size ~1/sqrt(k): within a few float32 ulps of the exact sum.
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_skinny_linear_refuses_what_it_does_not_take(kernel, dtype):
    x = torch.randn(5, 64).to(dtype)
    with pytest.raises(RuntimeError, match="1..4 rows"):
        kernel(x, torch.randn(16, 64).to(dtype), None)
    with pytest.raises(RuntimeError, match="K a multiple of 32"):
        kernel(x[:1, :48], torch.randn(16, 48).to(dtype), None)
    with pytest.raises(RuntimeError, match="one dtype"):
        kernel(x[:1], torch.randn(16, 64, dtype=torch.float64), None)
    with pytest.raises(RuntimeError, match="no Double kernel"):
        kernel(x[:1].double(), torch.randn(16, 64, dtype=torch.float64), None)


def test_model_routes_small_products_to_the_kernel(kernel, dtype, tiny_llama, cache_dir):
    """Decode at batch <= 4 runs the packed matmuls through the kernel (prefill does not), and
    generates what oneDNN alone does, within the dtype's rounding."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    opts = dict(dtype=str(dtype).removeprefix("torch."), cache_dir=cache_dir, num_kv_tokens=1024, max_model_len=128,
                max_num_batched_tokens=256)
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
