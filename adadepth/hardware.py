"""What the machine can do: the CPU's instruction-set flags and the compute dtype they call for."""
from __future__ import annotations

import platform

# Flags that give bfloat16 dot products in hardware: with them oneDNN's bf16 matmuls read half the
# bytes of fp32 at the same speed per byte; without them bf16 is emulated and slower than fp32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
# The flags benchmarks record beside every figure (what decides which kernels run).
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16")


def cpu_flags() -> set[str]:
    """The flags /proc/cpuinfo lists for this CPU (empty where there is no such file)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa_summary() -> list[str]:
    """The ISA flags that matter here, as this CPU reports them."""
    flags = cpu_flags()
    return [f for f in ISA_FLAGS if f in flags]


def cpu_has_bf16() -> bool:
    import torch

    mkldnn_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return (any(f in cpu_flags() for f in BF16_CPU_FLAGS) and torch.backends.mkldnn.is_available()
            and (mkldnn_bf16 is None or bool(mkldnn_bf16())))


def auto_dtype(device: str) -> str:
    """The fastest dtype that keeps the model's quality: bfloat16 on GPUs and on CPUs with bf16 dot
    products (AVX512-BF16 or AMX), float32 on other CPUs."""
    if device.startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if cpu_has_bf16() else "float32"


def release_openmp_threads() -> bool:
    """Free the calling thread's OpenMP thread pool (OpenMP 5's omp_pause_resource_all); True if done.

    Why: GNU OpenMP gives every thread that starts a parallel region its own pool of workers. Once
    the main thread has one (loading a model runs parallel ops) and another thread computes too
    (the server's engine thread), there are more OpenMP threads than cores, and libgomp stops
    letting idle workers spin: every parallel op then waits for a sleeping worker to wake, and on a
    2-core machine a served decode step ran far slower than the same step offline. Call it from the
    main thread before another thread takes over the compute."""
    import ctypes
    import glob
    import os

    import torch

    candidates = sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp*.so*")))
    for name in candidates + ["libgomp.so.1"]:
        try:
            pause = ctypes.CDLL(name).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause(1) == 0  # omp_pause_soft: the pool's threads exit; a later region recreates one
    return False


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def use_huge_pages() -> bool:
    """Have PyTorch's CPU allocator back tensors of 2 MiB and more with transparent huge pages
    (its THP_MEM_ALLOC_ENABLE); the environment variable, when set, wins. True if on.

    Why: a decode step streams every weight matrix from memory once. In 4 KiB pages a full-depth
    bf16 step of the default model crosses ~66,000 of them, each a TLB miss and a page walk on the
    way; in 2 MiB pages, ~130. Call it before the model's tensors are allocated (PyTorch reads the
    variable once). The kernel must allow huge pages on request (transparent_hugepage `madvise`
    or `always`)."""
    import os

    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return os.environ["THP_MEM_ALLOC_ENABLE"] == "1"


def pin_malloc_thresholds(mmap_bytes: int = 64 << 20) -> bool:
    """Fix glibc malloc's mmap threshold at mmap_bytes and its trim threshold at twice that (True if
    set; False off glibc or when the MALLOC_MMAP_THRESHOLD_ environment variable sets it: that wins).

    Why: every step makes and frees the same large tensors (a 64-row step's float32 logits are
    64 x 49152 x 4 B = 12.6 MB; a 4096-token prefill's MLP activations are 25 MB in bf16). An
    allocation above the mmap threshold is a fresh mapping whose every 4 KiB page faults on first
    touch, so such a tensor pays its page faults again each step; below the threshold the heap hands
    the memory just freed back, already mapped. glibc's own threshold starts at 128 KiB and rises
    as mapped blocks are freed, so what a step pays would depend on the traffic seen so far. Fixed
    above a step's tensors, they come from the heap from the first step on; the trim threshold
    returns a freed heap top beyond twice that to the OS, which bounds what the heap keeps idle.
    Fixing either also stops glibc's adjustment of the other."""
    import ctypes
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 * mmap_bytes))
