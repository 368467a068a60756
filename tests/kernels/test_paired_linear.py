"""The small-batch matmul on a packed weight (bf16 in k-pairs, float32 in 8-column blocks) against its
reference, and in the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adadepth import LLM, SamplingParams
from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.kernels.paired_linear import (pack_blocks, pack_for_kernel, pack_pairs, paired_linear_ref, unpack_blocks,
                                            unpack_pairs)
from adadepth.model.packed_linear import PackedLinear
from output_helpers import chosen_logprobs


@pytest.fixture(scope="module")
def cpu_ops(tmp_path_factory):
    ops = load_cpu_ops(str(tmp_path_factory.mktemp("ext")))
    if ops is None or ops.paired_linear is None:
        pytest.skip("no C++ compiler, or neither AVX512-BF16 nor AVX2 on this CPU: the model keeps oneDNN")
    return ops


@pytest.fixture(params=["bfloat16", "float32"])
def dtype(request, cpu_ops) -> torch.dtype:
    if getattr(torch, request.param) not in cpu_ops.paired_dtypes:
        pytest.skip(f"no {request.param} kernel on this CPU (bf16 needs AVX512-BF16, float32 AVX2 and FMA)")
    return getattr(torch, request.param)


@pytest.fixture
def kernel(cpu_ops):
    return cpu_ops.paired_linear


def _close(got: torch.Tensor, x, w, b) -> None:
    """Against the reference on the same values: bf16 sums in float32 too (in another order), so one
    bf16 rounding step apart at most; float32 within a few ulps of the exact sum."""
    if got.dtype == torch.bfloat16:
        want = (x.float() @ w.float().T + (0 if b is None else b.float())).bfloat16()
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
        torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=2 ** -7, atol=1e-3)
    else:
        exact = x.double() @ w.double().T + (0 if b is None else b.double())
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)


def test_pack_pairs_layout_and_inverse():
    w = torch.arange(32 * 6, dtype=torch.float32).view(32, 6)
    p = pack_pairs(w)
    assert p.shape == (2, 3, 16, 2) and p.is_contiguous()
    assert p[1, 2, 5, 1] == w[16 + 5, 2 * 2 + 1]
    assert torch.equal(unpack_pairs(p), w)
    with pytest.raises(ValueError, match="N % 16"):
        pack_pairs(torch.zeros(24, 6))
    with pytest.raises(ValueError, match="K even"):
        pack_pairs(torch.zeros(16, 5))


def test_pack_blocks_layout_and_inverse():
    w = torch.arange(24 * 5, dtype=torch.float32).view(24, 5)
    p = pack_blocks(w)
    assert p.shape == (3, 5, 8) and p.is_contiguous()
    assert p[2, 4, 3] == w[16 + 3, 4]
    assert torch.equal(unpack_blocks(p), w)
    assert pack_for_kernel(w).shape == (3, 5, 8) and pack_for_kernel(w[:16, :4].bfloat16()).shape == (1, 2, 16, 2)
    with pytest.raises(ValueError, match="N % 8"):
        pack_blocks(torch.zeros(12, 6))


# Rows: one tile and less (bf16 tiles: 8 rows, float32: 6), tiles of equal height, many tiles.
# Columns: whole groups of blocks (bf16: 3 of 16, float32: 2 of 8) and a last, smaller group.
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 8, 9, 16, 17, 33, 48, 70, 130])
@pytest.mark.parametrize("k,n,bias", [(64, 16, False), (576, 960, True), (1536, 576, False), (34, 48, True),
                                      (576, 32, True), (64, 80, False)])
def test_paired_linear_equals_its_reference(kernel, dtype, rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    packed = pack_for_kernel(w)
    got = kernel(x, packed, b)
    assert got.shape == (rows, n) and got.dtype == dtype
    _close(got, x, w, b)
    torch.testing.assert_close(got.float(), paired_linear_ref(x.float(), packed.float(), None if b is None else b.float())
                               .to(dtype).float(), rtol=2 ** -7, atol=1e-3)


def test_paired_linear_refuses_what_it_does_not_take(kernel, dtype):
    w = pack_for_kernel(torch.randn(16, 64).to(dtype))
    with pytest.raises(RuntimeError, match="no Double kernel"):
        kernel(torch.randn(3, 64, dtype=torch.float64), w, None)
    with pytest.raises(RuntimeError, match="cannot take"):
        kernel(torch.randn(3, 64).to(dtype), w.double(), None)
    with pytest.raises(RuntimeError, match="no Double kernel"):
        kernel(torch.randn(3, 64, dtype=torch.float64), w.double(), None)
    with pytest.raises(RuntimeError, match="inputs"):
        kernel(torch.randn(3, 62).to(dtype), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel(torch.randn(3, 64).to(dtype), w, torch.randn(8).to(dtype))
    other = pack_pairs(torch.randn(16, 64)) if dtype == torch.float32 else pack_blocks(torch.randn(16, 64)).bfloat16()
    with pytest.raises(RuntimeError, match="takes w_paired"):
        kernel(torch.randn(3, 64).to(dtype), other.to(dtype), None)


@pytest.fixture
def half_weights(cpu_ops) -> bool:
    if not cpu_ops.paired_half_weights:
        pytest.skip("no float16-weight kernel on this CPU (needs AVX2, FMA and F16C)")
    return True


@pytest.mark.parametrize("rows", [1, 4, 6, 7, 16, 33, 130])
@pytest.mark.parametrize("k,n,bias", [(576, 960, True), (1536, 576, False), (34, 48, True)])
def test_float16_weights_serve_float32_rows_exactly_widened(kernel, half_weights, rows, k, n, bias):
    """float32 x against a float16 copy: the float32 product of the float16 values (widened exactly),
    equal to the float32 copy's product on weights rounded to float16 (same sums, same order)."""
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g)
    w = (torch.randn(n, k, generator=g) / k ** 0.5).half().float()     # float16 values, held in float32
    b = torch.randn(n, generator=g) if bias else None
    half = pack_for_kernel(w, torch.float16)
    assert half.dtype == torch.float16 and half.shape == (n // 8, k, 8)
    got = kernel(x, half, b)
    assert got.dtype == torch.float32
    _close(got, x, w, b)
    assert torch.equal(got, kernel(x, pack_for_kernel(w), b))
    torch.testing.assert_close(got, paired_linear_ref(x, half, b), rtol=1e-5, atol=1e-5)


def test_packed_linear_reads_a_float16_copy(kernel, half_weights):
    layer = PackedLinear(nn.Linear(64, 32))
    with torch.no_grad():
        layer.weight.copy_(layer.weight.half())
    layer.use_paired(kernel, (torch.float32,), torch.float16)
    assert layer.paired_weight().dtype == torch.float16 and layer.paired_weight().shape == (4, 64, 8)
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 or float16"):
        layer.use_paired(kernel, (torch.float32,), torch.bfloat16)


def test_packed_linear_routes_by_rows_and_repacks_a_changed_weight(kernel, dtype):
    layer = PackedLinear(nn.Linear(64, 32, dtype=dtype))
    layer.use_paired(kernel, (dtype,))
    bf16 = dtype == torch.bfloat16
    assert layer._paired_w is not None and layer._paired_w.shape == ((2, 32, 16, 2) if bf16 else (4, 64, 8))  # at load
    calls = []
    layer.paired = lambda x, w, b: calls.append(x.shape[0]) or kernel(x, w, b)
    with torch.no_grad():
        for rows in (1, 8, PackedLinear.paired_max_rows, PackedLinear.paired_max_rows + 1):
            x = torch.randn(rows, 64).to(dtype)
            torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight, layer.bias).float(),
                                       rtol=2 ** -7, atol=1e-2)
        # bf16: one row goes to the skinny kernel where there is one (not here: oneDNN); past
        # paired_max_rows oneDNN either way.
        assert calls == ([1] if not bf16 else []) + [8, PackedLinear.paired_max_rows]
        layer.weight.mul_(2)                                   # in place: the packed copy must follow
        x = torch.randn(8, 64).to(dtype)
        _close(layer(x), x, layer.weight, layer.bias)
    odd = PackedLinear(nn.Linear(64, 24, dtype=dtype))
    odd.use_paired(kernel, (dtype,))
    assert odd.paired is None                                  # N not a multiple of 16: oneDNN
    with pytest.raises(ValueError, match="dtypes"):
        odd.use_paired(kernel)


def test_model_decodes_batches_with_the_kernel(kernel, dtype, tiny_llama, cache_dir):
    """Decode at batch 6 runs the packed matmuls through the paired kernel and generates what oneDNN
    alone does, within the dtype's rounding."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    opts = dict(dtype=str(dtype).removeprefix("torch."), cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=128,
                max_num_batched_tokens=256)
    prompts = [f"question {i}: what is {i} plus {i}?" for i in range(6)]
    fast = LLM(tiny_llama, **opts)
    fast.engine.model.fused_decode = None  # the Python layer loop, whose matmul calls the spy below sees
    linears = [m for m in fast.engine.model.modules() if isinstance(m, PackedLinear)]
    assert linears and all(m.paired is not None for m in linears if m.out_features % 16 == 0)
    rows_seen = []
    for m in linears:
        if m.paired is not None:
            m.paired = (lambda f: lambda x, w, b: rows_seen.append(x.shape[0]) or f(x, w, b))(m.paired)
    got = fast.generate(prompts, params)
    assert 6 in rows_seen and max(rows_seen) <= PackedLinear.paired_max_rows
    plain = LLM(tiny_llama, **opts)
    for m in plain.engine.model.modules():
        if isinstance(m, PackedLinear):
            m.use_paired(None)
    want = plain.generate(prompts, params)
    for a, b in zip(got, want):
        lp_a = torch.tensor(chosen_logprobs(a))
        lp_b = torch.tensor(chosen_logprobs(b))
        assert a.token_ids[:2] == b.token_ids[:2]
        torch.testing.assert_close(lp_a[:2], lp_b[:2], rtol=0.05, atol=0.05)
