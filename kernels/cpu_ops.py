"""The fused C++ CPU kernels (paged decode attention, the small layer ops, bf16 matmuls of a few
rows, grammar masks), built once per machine.

The C++ sources are compiled by `torch.utils.cpp_extension` (a C++ compiler is needed) the first
time, into the adadepth cache folder, and registered as `torch.ops.adadepth.*`.
`load_cpu_ops` returns None when that is not possible, and callers keep the PyTorch references.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .layer_ops import LayerOps

SOURCES = [Path(__file__).with_name(name)
           for name in ("paged_attention_cpu.cpp", "layer_ops_cpu.cpp", "token_bitmask_cpu.cpp", "skinny_linear_cpu.cpp",
                        "paired_linear_cpu.cpp", "decode_layers_cpu.cpp")]
HEADERS = [Path(__file__).with_name(name) for name in ("cpu_math.h", "cpu_linear.h")]
logger = logging.getLogger(__name__)


def _cpu_tag() -> str:
    """Short id of this CPU's instruction set and of the sources: a cache folder shared by machines
    of different CPUs (a mounted volume) must not hand one the other's -march=native build."""
    flags = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), flags)
    except OSError:
        pass
    digest = hashlib.sha256(flags.encode())
    for source in SOURCES + HEADERS:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def load_cpu_ops(build_root: str) -> LayerOps | None:
    """Compile (first time on this machine) and load the C++ kernels; None if that fails.

    The ops are registered process-wide by the first load; later calls (any build_root) find them
    registered and return them without building or loading a second copy."""
    from torch.utils import cpp_extension

    _put_ninja_on_path()
    registered = _registered_ops()
    if registered is not None:
        return registered
    name = "adadepth_cpu_ops"
    build_dir = os.path.join(build_root, f"torch-{torch.__version__}-{_cpu_tag()}", name)
    try:
        os.makedirs(build_dir, exist_ok=True)
        # -march=native: the build runs on (and is cached for) the machine that uses it;
        # -fno-math-errno -fno-trapping-math: errno and FP exceptions are never read, and without
        # them GCC vectorises the exp and rounding in `omp simd` loops.
        cpp_extension.load(name, [str(s) for s in SOURCES],
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"],
                           extra_ldflags=["-fopenmp"], build_directory=build_dir, is_python_module=False)
    except Exception as exc:  # no compiler, no ninja, a read-only cache: the references still work
        logger.warning("CPU kernels unavailable (%s); the layers use their PyTorch references",
                       str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
    return _registered_ops()


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; the pip-installed one sits in the venv's bin folder
    (or the ninja package's), which is not on PATH when the venv's python is run directly."""
    if shutil.which("ninja"):
        return
    folders = [os.path.dirname(sys.executable)]
    try:
        import ninja

        folders.append(ninja.BIN_DIR)
    except (ImportError, AttributeError):
        pass
    found = next((f for f in folders if shutil.which("ninja", path=f)), None)
    if found:
        os.environ["PATH"] = found + os.pathsep + os.environ.get("PATH", "")


# Prompt chunks up to this many (query, key) pairs run through the paged kernel (LayerOps.
# chunk_pairs_limit), below where it stopped beating SDPA on whole prompts on a 2-core Zen 4
# (benchmarks/results/chunk_attention.json): its AVX512-BF16 path was faster up to 512 tokens and
# slower from 1024, its portable float32 loop even with SDPA at 32 tokens and slower from 64.
CHUNK_PAIRS_BF16 = 768 * 769 // 2
CHUNK_PAIRS_PORTABLE = 32 * 33 // 2


def _chunk_pairs_limit(bf16_fast) -> Callable[[torch.dtype, int, int], int]:
    def limit(dtype: torch.dtype, head_dim: int, group: int) -> int:
        if dtype not in (torch.float32, torch.bfloat16):
            return 0  # the kernel's dtypes only
        return CHUNK_PAIRS_BF16 if dtype == torch.bfloat16 and bf16_fast(head_dim, group) else CHUNK_PAIRS_PORTABLE
    return limit


def _registered_ops() -> LayerOps | None:
    try:
        ops = torch.ops.adadepth
        # bf16 kernels need AVX512-BF16, the float32 paired one AVX2 and FMA (this build: -march=native).
        paired_dtypes = tuple(d for d in (torch.bfloat16, torch.float32) if ops.paired_linear_supports(d))
        return LayerOps(rms_norm=ops.rms_norm, add_rms_norm=ops.add_rms_norm, rope_write_kv=ops.rope_write_kv,
                        silu_and_mul=ops.silu_and_mul, paged_attention=ops.paged_decode_attention,
                        skinny_linear=ops.skinny_linear if ops.skinny_linear_supported() else None,
                        paired_linear=ops.paired_linear if paired_dtypes else None, paired_dtypes=paired_dtypes,
                        paired_half_weights=torch.float32 in paired_dtypes and ops.paired_linear_half_weights(),
                        chunk_pairs_limit=_chunk_pairs_limit(ops.paged_attention_bf16_fast),
                        decode_layers=ops.decode_layers if paired_dtypes else None)
    except (AttributeError, RuntimeError):
        return None
