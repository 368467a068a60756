"""The dtype `--dtype auto` picks from the CPU's flags, and the OpenMP pool release."""
from __future__ import annotations

import pytest
import torch

from adadepth import hardware
from adadepth.config import ModelConfig


@pytest.mark.parametrize("flags, want", [
    ({"avx2", "avx512f", "avx512_bf16"}, "bfloat16"),
    ({"avx2", "amx_tile", "amx_bf16"}, "bfloat16"),
    ({"avx2", "fma", "avx512f"}, "float32"),      # AVX-512 without bf16 dot products
    (set(), "float32"),
])
def test_auto_dtype_follows_the_cpu_flags(monkeypatch, flags, want):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    assert hardware.auto_dtype("cpu") == want
    assert ModelConfig(dtype="auto").resolved_dtype() == want
    assert ModelConfig(dtype="float32").resolved_dtype() == "float32"


def test_auto_dtype_is_bf16_on_gpus_and_the_choice_is_validated():
    assert hardware.auto_dtype("cuda:0") == "bfloat16"
    with pytest.raises(ValueError, match="auto, float32"):
        ModelConfig(dtype="int8")


def test_isa_summary_lists_only_known_flags(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "avx512_bf16", "sse2", "made_up"})
    assert hardware.isa_summary() == ["avx2", "avx512_bf16"]


def test_releasing_the_openmp_pool_leaves_torch_working():
    x = torch.ones(1 << 20)
    assert float(x.sum()) == 1 << 20             # the calling thread has a pool now
    assert hardware.release_openmp_threads() is True
    assert float((x * 2).sum()) == 2 * (1 << 20)  # a new pool is made on demand


def test_malloc_thresholds_are_pinned_unless_the_environment_sets_them(monkeypatch):
    import platform

    from adadepth.hardware import pin_malloc_thresholds

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert pin_malloc_thresholds() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert pin_malloc_thresholds() is (platform.libc_ver()[0] == "glibc")


def test_pinned_thresholds_keep_a_step_sized_tensor_on_the_heap():
    """A 16 MiB tensor made and freed again and again (as a step's logits are) is handed the same
    memory back: it does not fault in its 4096 pages each time, as it would as a fresh mapping."""
    import platform
    import resource

    from adadepth.hardware import pin_malloc_thresholds

    if platform.libc_ver()[0] != "glibc" or not pin_malloc_thresholds():
        pytest.skip("glibc malloc only (and not with MALLOC_MMAP_THRESHOLD_ set)")
    numel = (16 << 20) // 4
    torch.empty(numel).fill_(1.0)  # the heap grows once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        torch.empty(numel).fill_(1.0)
    faults_per_tensor = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
    assert faults_per_tensor < 4096 / 8
