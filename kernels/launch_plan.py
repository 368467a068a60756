"""Launch shapes and parameter blocks of the batched-skip kernels: pure Python (no GPU, no
cuda-python), so the choices are unit-tested on CPU. Used by `batched_skip_kernels.py`."""

from __future__ import annotations

import ctypes
import functools
import types
from dataclasses import dataclass

import torch

from .batched_skip_ref import DTYPE_SUFFIX, require

# Elements per 16-byte vector, per dtype. A read-only view: no mutable state.
_VEC = types.MappingProxyType({torch.float32: 4, torch.float16: 8, torch.bfloat16: 8})

MAX_ROW_THREADS = 512  # the row kernels' __launch_bounds__
CACHED_MAXV = 4  # vectors per thread the cached row kernels hold in registers
PER_ROW_GRID_MIN_THREADS = 128  # from this block size on, launch one block per row
COMPACT_THREADS = 1024
COMPACT_CHUNK = 4 * COMPACT_THREADS  # rows per compaction block

KERNEL_NAMES = ("adadepth_active_rows",) + tuple(
    f"adadepth_{op}_{dt}_{variant}"
    for op in ("gather_rmsnorm", "scatter_residual_add")
    for dt, vec in (("f32", 4), ("f16", 8), ("bf16", 8))
    for variant in (f"v{vec}", f"v{vec}_stream", "v1_stream")
)


# -------------------------------------------------------------------------------------------
# Launch planning (pure: unit-tested on CPU)
# -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RowKernelPlan:
    suffix: str  # e.g. "bf16_v8", "bf16_v8_stream", "bf16_v1_stream"
    threads: int


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def plan_row_kernel(
    dtype: torch.dtype,
    dim: int,
    ptrs: tuple[int, ...],
    row_strides: tuple[int, ...],
    vectors_per_thread: int = 4,
) -> RowKernelPlan:
    """Pick the row-kernel variant and block size for rows of ``dim`` elements.

    16-byte vectors need every pointer and every row stride (in bytes) to be a multiple of 16;
    the cached variant also needs the row to fit in 4 vectors x 512 threads.
    ``vectors_per_thread`` (1..4) sizes the cached variant's blocks.
    """
    misalign = 0
    for p in ptrs:
        misalign |= p
    for st in row_strides:
        misalign |= st * dtype.itemsize
    return _plan(dtype, dim, misalign % 16 == 0, vectors_per_thread)


@functools.lru_cache(maxsize=256)
def _plan(dtype: torch.dtype, dim: int, aligned: bool, vectors_per_thread: int) -> RowKernelPlan:
    require(1 <= vectors_per_thread <= CACHED_MAXV, f"vectors_per_thread must be 1..{CACHED_MAXV}")
    vec = _VEC[dtype]
    dt = DTYPE_SUFFIX[dtype]
    if aligned and dim % vec == 0:
        nvec = dim // vec
        if nvec <= CACHED_MAXV * MAX_ROW_THREADS:
            # Up to 4 vectors per thread: several 16-byte loads in flight per thread while
            # blocks stay small enough for many to share an SM (on an H200, 4 beat 2 and 1
            # for 16-bit rows of 576 to 4096 and tied for fp32).
            threads = min(
                MAX_ROW_THREADS, max(32, _round_up(-(-nvec // vectors_per_thread), 32))
            )
            return RowKernelPlan(f"{dt}_v{vec}", threads)
        return RowKernelPlan(f"{dt}_v{vec}_stream", MAX_ROW_THREADS)
    threads = min(MAX_ROW_THREADS, max(32, _round_up(-(-dim // 4), 32)))
    return RowKernelPlan(f"{dt}_v1_stream", threads)


# Kernel parameter blocks, laid out like the kernels' C parameter lists in batched_skip.cu
# (keep them in the same order with the same C types). ctypes uses the C ABI's natural
# alignment, so each field's offset is where cuLaunchKernel must find that argument.
def _params_struct(name: str, fields: list[tuple[str, type]]) -> type:
    cls = type(name, (ctypes.Structure,), {"_fields_": fields})
    cls.offsets = tuple(getattr(cls, f).offset for f, _ in fields)
    return cls


ActiveRowsParams = _params_struct("ActiveRowsParams", [
    ("row_depth", ctypes.c_void_p), ("n", ctypes.c_int32), ("layer_rank", ctypes.c_int32),
    ("chunk", ctypes.c_int32), ("active_idx", ctypes.c_void_p), ("count", ctypes.c_void_p),
])
GatherParams = _params_struct("GatherParams", [
    ("hidden", ctypes.c_void_p), ("ld_hidden", ctypes.c_int64), ("n_rows", ctypes.c_int32),
    ("active_idx", ctypes.c_void_p), ("n_idx", ctypes.c_int32), ("count", ctypes.c_void_p),
    ("weight", ctypes.c_void_p), ("out", ctypes.c_void_p), ("ld_out", ctypes.c_int64),
    ("gathered", ctypes.c_void_p), ("ld_gathered", ctypes.c_int64), ("dim", ctypes.c_int32),
    ("eps", ctypes.c_float),
])
ScatterParams = _params_struct("ScatterParams", [
    ("hidden", ctypes.c_void_p), ("ld_hidden", ctypes.c_int64), ("n_rows", ctypes.c_int32),
    ("update", ctypes.c_void_p), ("ld_update", ctypes.c_int64),
    ("active_idx", ctypes.c_void_p), ("n_idx", ctypes.c_int32), ("count", ctypes.c_void_p),
    ("scale", ctypes.c_float), ("next_weight", ctypes.c_void_p),
    ("normed_out", ctypes.c_void_p), ("ld_normed", ctypes.c_int64), ("dim", ctypes.c_int32),
    ("eps", ctypes.c_float),
])
