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
    memory back: it does not fault in its 4096 pages each time, as it would as a fresh mapping.
    In a fresh process, as a server starts: the heap of a long test run may sit above the trim
    threshold, which then hands part of each freed tensor back to the OS."""
    import json
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc" or os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        pytest.skip("glibc malloc only (and not with MALLOC_MMAP_THRESHOLD_ set)")
    code = ("import json, resource, torch\nfrom adadepth.hardware import pin_malloc_thresholds\n"
            "pinned = pin_malloc_thresholds()\nnumel = (16 << 20) // 4\n"
            "torch.empty(numel).fill_(1.0)\n"  # the heap grows once
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(20):\n    torch.empty(numel).fill_(1.0)\n"
            "print(json.dumps([pinned, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    pinned, faults_per_tensor = json.loads(out.stdout.strip().splitlines()[-1])
    assert pinned
    assert faults_per_tensor < 4096 / 8


def _huge_pages_of_a_fresh_process(env: dict) -> tuple[bool, int]:
    """In a new process: use_huge_pages(), then a 64 MiB tensor; (its answer, AnonHugePages in kB)."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json, torch\nfrom adadepth.hardware import use_huge_pages\non = use_huge_pages()\n"
            "x = torch.empty(16 << 20); x.fill_(1.0)\n"
            "kb = [int(l.split()[1]) for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]\n"
            "print(json.dumps([on, kb[0] if kb else 0]))")
    full = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"} | env
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_huge_pages_back_large_tensors_unless_the_environment_says_no():
    import os

    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages here")
    if "[never]" in mode or not os.path.exists("/proc/self/smaps_rollup"):
        pytest.skip("transparent huge pages are off on this machine")
    on, kb = _huge_pages_of_a_fresh_process({})
    assert on is True and kb >= 32 << 10          # most of the 64 MiB tensor in 2 MiB pages
    off, kb_off = _huge_pages_of_a_fresh_process({"THP_MEM_ALLOC_ENABLE": "0"})
    assert off is False and kb_off < kb
