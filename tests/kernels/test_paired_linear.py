"""The small-batch bf16 matmul on weights packed in k-pairs, against its reference, and in the model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adadepth import LLM, SamplingParams
from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.kernels.paired_linear import pack_pairs, paired_linear_ref, unpack_pairs
from adadepth.model.packed_linear import PackedLinear
from output_helpers import chosen_logprobs


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    ops = load_cpu_ops(str(tmp_path_factory.mktemp("ext")))
    if ops is None or ops.paired_linear is None:
        pytest.skip("no C++ compiler or no AVX512-BF16 on this CPU: the model keeps oneDNN for every matmul")
    return ops.paired_linear


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


# Rows: one tile of 8 and less, tiles of equal height (16 = 8 + 8, 17 = 6 + 6 + 5), many tiles.
# Columns: whole groups of 3 blocks of 16 (48, 576, 960) and a last group of 1 (16) or 2 (32, 80).
@pytest.mark.parametrize("rows", [1, 5, 8, 9, 16, 17, 33, 48, 70, 130])
@pytest.mark.parametrize("k,n,bias", [(64, 16, False), (576, 960, True), (1536, 576, False), (34, 48, True),
                                      (576, 32, True), (64, 80, False)])
def test_paired_linear_equals_its_reference(kernel, rows, k, n, bias):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / k ** 0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    got = kernel(x, pack_pairs(w), b)
    assert got.shape == (rows, n) and got.dtype == torch.bfloat16
    # The reference sums in float32 too (in another order): one bf16 rounding step apart at most.
    want = paired_linear_ref(x.float(), pack_pairs(w).float(), None if b is None else b.float()).bfloat16()
    torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    torch.testing.assert_close(got.float(), F.linear(x, w, b).float(), rtol=2 ** -7, atol=1e-3)


def test_paired_linear_refuses_what_it_does_not_take(kernel):
    w = pack_pairs(torch.randn(16, 64).bfloat16())
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel(torch.randn(3, 64), w.float(), None)
    with pytest.raises(RuntimeError, match="inputs"):
        kernel(torch.randn(3, 62).bfloat16(), w, None)
    with pytest.raises(RuntimeError, match="bias"):
        kernel(torch.randn(3, 64).bfloat16(), w, torch.randn(8).bfloat16())


def test_packed_linear_routes_by_rows_and_repacks_a_changed_weight(kernel):
    layer = PackedLinear(nn.Linear(64, 32, dtype=torch.bfloat16))
    layer.use_paired(kernel)
    assert layer._paired_w is not None and layer._paired_w.shape == (2, 32, 16, 2)   # packed at load
    calls = []
    layer.paired = lambda x, w, b: calls.append(x.shape[0]) or kernel(x, w, b)
    with torch.no_grad():
        for rows in (8, PackedLinear.paired_max_rows, PackedLinear.paired_max_rows + 1):
            x = torch.randn(rows, 64).bfloat16()
            torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight, layer.bias).float(),
                                       rtol=2 ** -7, atol=1e-2)
        assert calls == [8, PackedLinear.paired_max_rows]     # past paired_max_rows: oneDNN
        layer.weight.mul_(2)                                   # in place: the k-pair copy must follow
        x = torch.randn(8, 64).bfloat16()
        torch.testing.assert_close(layer(x).float(), F.linear(x, layer.weight, layer.bias).float(),
                                   rtol=2 ** -7, atol=1e-2)
    odd = PackedLinear(nn.Linear(64, 24, dtype=torch.bfloat16))
    odd.use_paired(kernel)
    assert odd.paired is None                                  # N not a multiple of 16: oneDNN


def test_model_decodes_batches_past_four_with_the_kernel(kernel, tiny_llama, cache_dir):
    """Decode at batch 6 in bf16 runs the packed matmuls through the paired kernel and generates what
    oneDNN alone does, within bf16 rounding."""
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=0)
    opts = dict(dtype="bfloat16", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=128,
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
