"""The fused CPU layer ops: each PyTorch reference against an independent definition (PyTorch's
own ops, transformers' rotary embedding), each C++ kernel against its reference in float32,
bfloat16 and float64, bad input, and the loader's fallbacks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.kernels.layer_ops import (
    LayerOps,
    add_rms_norm_ref,
    rms_norm_ref,
    rope_write_kv_ref,
    silu_and_mul_ref,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
# bf16 kernels and references both compute in float32 and round once: they may differ by one
# rounding step where the float32 results straddle a bf16 boundary.
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
       torch.bfloat16: dict(rtol=1 / 64, atol=1 / 64)}


@pytest.fixture(scope="module")
def ops(tmp_path_factory) -> LayerOps:
    built = load_cpu_ops(str(tmp_path_factory.mktemp("extensions")))
    assert built is not None, "the C++ CPU kernels did not build (see the warning logged)"
    return built


def rope_case(n: int, num_heads: int, num_kv_heads: int, head_dim: int, num_slots: int, dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(n, (num_heads + 2 * num_kv_heads) * head_dim, generator=g).to(dtype)
    angles = torch.rand(n, head_dim // 2, generator=g) * 50
    cos, sin = angles.cos() * 1.1, angles.sin() * 1.1                       # a rope attention scaling of 1.1
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=g).to(dtype)
    slots = torch.randperm(num_slots, generator=g)[:n]
    return qkv, cos, sin, k_cache, v_cache, slots


# ---- references against independent definitions --------------------------------------------
def test_rms_norm_ref_is_pytorchs_rms_norm():
    x, w = torch.randn(7, 48, dtype=torch.float64), torch.randn(48, dtype=torch.float64)
    torch.testing.assert_close(rms_norm_ref(x, w, 1e-5), F.rms_norm(x, (48,), w, 1e-5))


def test_add_rms_norm_ref_returns_the_sum_and_its_norm_and_keeps_its_inputs():
    h, delta, w = torch.randn(5, 32), torch.randn(5, 32), torch.randn(32)
    h0, d0 = h.clone(), delta.clone()
    total, normed = add_rms_norm_ref(h, delta, w, 1e-6)
    torch.testing.assert_close(total, h0 + d0)
    torch.testing.assert_close(normed, F.rms_norm(h0 + d0, (32,), w, 1e-6))
    assert torch.equal(h, h0) and torch.equal(delta, d0)


def test_rope_ref_matches_transformers_and_writes_the_cache():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    n, num_heads, num_kv_heads, head_dim = 6, 4, 2, 16
    qkv, cos, sin, k_cache, v_cache, slots = rope_case(n, num_heads, num_kv_heads, head_dim, 20, torch.float64)
    original = qkv.clone().view(n, num_heads + 2 * num_kv_heads, head_dim)
    untouched = [s for s in range(20) if s not in set(slots.tolist())]
    k_before = k_cache.clone()
    rope_write_kv_ref(qkv, cos, sin, k_cache, v_cache, slots, num_heads, num_kv_heads)
    # transformers: (B, H, T, Dh) with cos/sin (B, T, Dh) holding each frequency twice.
    full_cos = torch.cat([cos, cos], -1).double()[None]                     # (1, n, Dh)
    full_sin = torch.cat([sin, sin], -1).double()[None]
    q_want, k_want = apply_rotary_pos_emb(original[None, :, :num_heads].transpose(1, 2),
                                          original[None, :, num_heads:num_heads + num_kv_heads].transpose(1, 2),
                                          full_cos, full_sin)
    rows = qkv.view(n, num_heads + 2 * num_kv_heads, head_dim)
    torch.testing.assert_close(rows[:, :num_heads], q_want[0].transpose(0, 1))
    torch.testing.assert_close(rows[:, num_heads:num_heads + num_kv_heads], k_want[0].transpose(0, 1))
    torch.testing.assert_close(rows[:, num_heads + num_kv_heads:], original[:, num_heads + num_kv_heads:])  # v as is
    torch.testing.assert_close(k_cache[slots], k_want[0].transpose(0, 1))
    torch.testing.assert_close(v_cache[slots], original[:, num_heads + num_kv_heads:])
    assert torch.equal(k_cache[untouched], k_before[untouched])


def test_silu_and_mul_ref_is_silu_of_the_first_half_times_the_second():
    x = torch.randn(3, 5, 2 * 24, dtype=torch.float64)
    torch.testing.assert_close(silu_and_mul_ref(x), F.silu(x[..., :24]) * x[..., 24:])


# ---- kernels against references -------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 200])           # 200 rows: split over threads
def test_rms_norm_kernel_matches_reference(ops, dtype, rows):
    x, w = (torch.randn(rows, 576) * 3).to(dtype), torch.randn(576).to(dtype)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 200])
def test_add_rms_norm_kernel_matches_reference(ops, dtype, rows):
    h, delta, w = (torch.randn(2, rows, 64) * 2).to(dtype), torch.randn(2, rows, 64).to(dtype), torch.randn(64).to(dtype)
    h0 = h.clone()
    total, normed = ops.add_rms_norm(h, delta, w, 1e-6)
    want_total, want_normed = add_rms_norm_ref(h, delta, w, 1e-6)
    assert torch.equal(total, want_total)                                    # one rounding of an exact sum
    torch.testing.assert_close(normed, want_normed, **TOL[dtype])
    assert torch.equal(h, h0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", [(1, 9, 3, 64), (5, 4, 4, 16), (300, 8, 1, 32)])
def test_rope_write_kv_kernel_matches_reference(ops, dtype, case):
    n, num_heads, num_kv_heads, head_dim = case
    got = rope_case(n, num_heads, num_kv_heads, head_dim, n + 7, dtype, seed=n)
    want = [t.clone() for t in got]
    ops.rope_write_kv(*got, num_heads, num_kv_heads)
    rope_write_kv_ref(*want, num_heads, num_kv_heads)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_kernel_matches_reference(ops, dtype):
    x = (torch.randn(4, 7, 2 * 1536) * 4).to(dtype)
    got = ops.silu_and_mul(x)
    assert got.shape == (4, 7, 1536)
    torch.testing.assert_close(got, silu_and_mul_ref(x), **TOL[dtype])


@pytest.mark.parametrize("call, message", [
    (lambda o: o.rms_norm(torch.randn(3, 8), torch.randn(6), 1e-5), "dimension of 6"),
    (lambda o: o.rms_norm(torch.randn(8, 3).t(), torch.randn(8), 1e-5), "contiguous"),
    (lambda o: o.add_rms_norm(torch.randn(3, 8), torch.randn(3, 8).double(), torch.randn(8), 1e-5), "dtype"),
    (lambda o: o.silu_and_mul(torch.randn(3, 7)), "2 I"),
    (lambda o: o.rope_write_kv(*rope_case(4, 2, 1, 8, 3, torch.float32)[:5], torch.tensor([0, 1, 2, 3]), 2, 1),
     "out of range"),
    (lambda o: o.rope_write_kv(*rope_case(4, 2, 1, 8, 9, torch.float32), 3, 1), "must end in a dimension"),
])
def test_kernels_reject_bad_input(ops, call, message):
    with pytest.raises(RuntimeError, match=message):
        call(ops)


# ---- the loader -------------------------------------------------------------------------------
def test_loader_falls_back_to_none_when_the_build_fails(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    from adadepth.kernels import cpu_ops

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(cpu_ops, "_registered_ops", lambda: None)   # as in a fresh process
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert load_cpu_ops(str(tmp_path)) is None
    assert "g++ not found" in caplog.text


def test_loader_falls_back_when_the_cache_folder_cannot_be_written(tmp_path, monkeypatch, caplog):
    from adadepth.kernels import cpu_ops

    monkeypatch.setattr(cpu_ops, "_registered_ops", lambda: None)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the build folder would go")
    assert load_cpu_ops(str(blocker)) is None
    assert "PyTorch references" in caplog.text
