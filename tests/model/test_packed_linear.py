"""oneDNN packed matmuls (CPU fp32 and bf16) must compute what nn.Linear computes, never go stale
when weights change, and leave the model's state dict exactly as it was."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adadepth import LLM, SamplingParams
from adadepth.model import packed_linear
from adadepth.model.packed_linear import PackedLinear, onednn_available, onednn_bf16_available, pack_linears
from output_helpers import chosen_logprobs

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this PyTorch build has no oneDNN")
needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16_available(),
                                       reason="oneDNN has no bf16 path on this CPU (AVX512-BW/VL/DQ or AVX-NE-CONVERT)")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (16, 48), (3, 7, 48), (300, 48)])
def test_matches_nn_linear(shape, bias):
    torch.manual_seed(0)
    linear = nn.Linear(48, 80, bias=bias)
    packed = PackedLinear(linear)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = linear(x), packed(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert packed._packed is not None, "fp32 CPU inference must take the packed path"


@needs_onednn_bf16
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 16, 300])
def test_bf16_matches_float32_math_on_the_same_values(rows, bias):
    """bf16 weights and inputs, float32 accumulation: against F.linear in float32 on the very same
    bf16 values, the only difference left is the output's rounding to bf16 (and summation order)."""
    torch.manual_seed(1)
    linear = nn.Linear(576, 192, bias=bias).bfloat16()
    packed = PackedLinear(linear)
    x = torch.randn(rows, 576).bfloat16()
    with torch.inference_mode():
        got = packed(x)
        want = torch.nn.functional.linear(x.float(), linear.weight.float(),
                                          None if linear.bias is None else linear.bias.float())
    assert got.dtype == torch.bfloat16 and packed._packed is not None, "bf16 CPU inference must take the packed path"
    torch.testing.assert_close(got.float(), want, rtol=1 / 64, atol=1 / 32)


def test_mixed_dtypes_are_not_packed_and_fail_as_nn_linear_does():
    linear = nn.Linear(16, 8).bfloat16()
    packed = PackedLinear(linear)
    x = torch.randn(2, 16)                                                      # fp32 input, bf16 weight
    with torch.inference_mode(), pytest.raises(RuntimeError):
        linear(x)
    with torch.inference_mode(), pytest.raises(RuntimeError):
        packed(x)
    assert packed._packed is None


def test_strided_rows_are_read_correctly():
    linear = nn.Linear(32, 16)
    packed = PackedLinear(linear)
    x = torch.randn(5, 64)[:, ::2]  # every other column: not contiguous
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)


def test_repacks_after_in_place_weight_change():
    linear = nn.Linear(24, 24, bias=False)
    packed = PackedLinear(linear)
    x = torch.randn(4, 24)
    with torch.inference_mode():
        before = packed(x)
    with torch.no_grad():
        linear.weight.mul_(2.0)
    with torch.inference_mode():
        after = packed(x)
    torch.testing.assert_close(after, 2 * before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_where_onednn_has_no_bf16_path_takes_f_linear(monkeypatch, bias):
    """Such CPUs (AVX2 without AVX-512) refuse to pack a bf16 weight: a bf16 model must still run."""
    monkeypatch.setattr(packed_linear, "onednn_bf16_available", lambda: False)
    linear = nn.Linear(64, 32, bias=bias).bfloat16()
    packed = PackedLinear(linear)
    x = torch.randn(5, 64).bfloat16()
    with torch.inference_mode():
        got, gated = packed(x), packed.silu_and_mul(x, lambda y: y[:, :16] * 2)
    assert packed._packed is None and packed._halves is None
    torch.testing.assert_close(got, torch.nn.functional.linear(x, linear.weight, linear.bias), rtol=0, atol=0)
    torch.testing.assert_close(gated, got[:, :16] * 2, rtol=0, atol=0)


def test_autograd_and_other_dtypes_fall_back_to_f_linear():
    linear = nn.Linear(8, 4)
    packed = PackedLinear(linear)
    x = torch.randn(3, 8)
    packed(x).sum().backward()  # grad enabled and weight requires grad: plain F.linear
    assert linear.weight.grad is not None and packed._packed is None
    x64 = torch.randn(3, 8, dtype=torch.float64)
    linear64 = nn.Linear(8, 4).double()
    with torch.inference_mode():
        torch.testing.assert_close(PackedLinear(linear64)(x64), linear64(x64))


def test_pack_keeps_state_dict_and_shares_parameters():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4, bias=False)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert model[0].weight is weight
    after = model.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k])


def test_engine_packs_in_fp32_and_generates_like_unpacked(tiny_llama, cache_dir):
    kwargs = dict(cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256, max_num_batched_tokens=512)
    prompts = ["hello world", "the quick brown fox jumps", "what is 2 + 2?"]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, depth=d, logprobs=0) for d in (6, 3, 5)]
    packed = LLM(tiny_llama, dtype="float32", **kwargs)
    plain = LLM(tiny_llama, dtype="float32", cpu_weight_prepack=False, **kwargs)
    assert any(isinstance(m, PackedLinear) for m in packed.engine.model.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.engine.model.modules())
    for a, b in zip(packed.generate(prompts, params), plain.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        lp_a = torch.tensor(chosen_logprobs(a))
        lp_b = torch.tensor(chosen_logprobs(b))
        torch.testing.assert_close(lp_a, lp_b, rtol=1e-4, atol=1e-4)


def test_weights_made_in_inference_mode_are_packed_too():
    with torch.inference_mode():
        linear = nn.Linear(16, 8)  # inference tensors: no version counter
        packed = PackedLinear(linear)
        x = torch.randn(2, 16)
        torch.testing.assert_close(packed(x), linear(x), rtol=1e-5, atol=1e-5)
        assert packed._packed is not None


def _gated_math(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """silu(x Wg^T + bg) * (x Wu^T + bu) in float64 on the very same values."""
    y = torch.nn.functional.linear(x.double(), linear.weight.double(),
                                   None if linear.bias is None else linear.bias.double())
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_onednn_bf16)])
@pytest.mark.parametrize("bias", [False, True])
def test_silu_and_mul_in_onednn_epilogues_matches_the_math(dtype, bias):
    """Past the kernels' rows (and always in fp32) the SiLU and the multiply run in oneDNN's
    epilogues; the result is the gated product, and in bf16 no further from it than rounding the
    whole gate/up product first (the reference's way) is."""
    from adadepth.kernels.layer_ops import silu_and_mul_ref

    torch.manual_seed(2)
    linear = nn.Linear(576, 2 * 384, bias=bias).to(dtype)
    packed = PackedLinear(linear)
    x = torch.randn(PackedLinear.paired_max_rows + 40, 576).to(dtype)
    calls = []
    reference = lambda y: calls.append(y.shape) or silu_and_mul_ref(y)  # noqa: E731
    with torch.inference_mode():
        got = packed.silu_and_mul(x, reference)
        unfused = silu_and_mul_ref(packed(x))
    want = _gated_math(x, linear)
    assert got.dtype == dtype and got.shape == (x.shape[0], 384) and calls == [], "oneDNN's path must not call the reference"
    assert packed._halves is not None
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    else:
        err, err_unfused = (got.double() - want).abs().mean(), (unfused.double() - want).abs().mean()
        torch.testing.assert_close(got.double(), want, rtol=1 / 32, atol=1 / 16)
        assert err <= err_unfused


def test_silu_and_mul_takes_the_reference_where_a_kernel_or_f_linear_runs():
    from adadepth.kernels.layer_ops import silu_and_mul_ref

    torch.manual_seed(3)
    linear = nn.Linear(64, 2 * 32).bfloat16()
    packed = PackedLinear(linear)
    packed.paired = lambda x, w, b: torch.nn.functional.linear(x, linear.weight, b)   # any kernel
    x = torch.randn(8, 64).bfloat16()
    with torch.inference_mode():
        got = packed.silu_and_mul(x, silu_and_mul_ref)
        assert torch.equal(got, silu_and_mul_ref(packed(x)))
    assert packed._halves is None
    # Autograd (weights that want gradients): F.linear, then the reference, and gradients flow.
    x32 = torch.randn(3, 64)
    linear32 = nn.Linear(64, 64)
    packed32 = PackedLinear(linear32)
    got32 = packed32.silu_and_mul(x32, silu_and_mul_ref)
    got32.sum().backward()
    assert linear32.weight.grad is not None and packed32._halves is None
    torch.testing.assert_close(got32.detach().double(), _gated_math(x32, linear32).detach(), rtol=1e-5, atol=1e-5)


def test_silu_and_mul_halves_follow_an_in_place_weight_change():
    from adadepth.kernels.layer_ops import silu_and_mul_ref

    torch.manual_seed(4)
    linear = nn.Linear(32, 2 * 16, bias=False)
    packed = PackedLinear(linear)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        packed.silu_and_mul(x, silu_and_mul_ref)
    with torch.no_grad():
        linear.weight[16:].mul_(3.0)  # the up half only
    with torch.inference_mode():
        got = packed.silu_and_mul(x, silu_and_mul_ref)
    torch.testing.assert_close(got.double(), _gated_math(x, linear), rtol=1e-5, atol=1e-5)
