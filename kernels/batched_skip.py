"""Batched-skip kernels: run one layer over only the active rows of a mixed-depth batch.

A row (a token) with depth ``d`` runs layer ``l`` iff ``d > rank[l]``. Per layer the engine calls

    active_idx, count = active_rows(row_depth, rank[l])
    x = gather_rmsnorm(hidden, active_idx, count, input_norm_weight, eps)
    ...                                       # attention / MLP on x[:count]
    scatter_residual_add(hidden, update, active_idx, count, scale, next_weight, eps, normed_out)

``count`` stays a 1-element int32 tensor on the device, so the CUDA path needs no host sync and
can be captured in a CUDA graph. Each public function dispatches on the tensors' device: CUDA
tensors go to the NVRTC-compiled kernels of ``batched_skip.cu``, CPU tensors to the ``*_ref``
PyTorch reference, which has the same semantics.

Semantics shared by both paths:

* ``active_idx`` (int32, (N,)): the active rows in ascending order in ``[:count]``, -1 after.
* Output buffers have ``len(active_idx)`` rows; rows at or after ``count`` are never written.
* Entries of ``active_idx[:count]`` outside ``[0, rows)`` are skipped (nothing read or written).
* RMSNorm is Hugging Face's Llama/Qwen2 one, in fp32:
  ``w * to_dtype(x * rsqrt(mean(x**2) + eps))`` with the product rounded to the dtype again.
* The residual update rounds like torch: ``to_dtype(h + u * scale)``, multiply then add.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

__all__ = [
    "BatchedSkipKernels",
    "DEFAULT_EPS",
    "KERNEL_NAMES",
    "SOURCE_PATH",
    "active_rows",
    "active_rows_ref",
    "compile_cubin",
    "gather_rmsnorm",
    "gather_rmsnorm_ref",
    "get_kernels",
    "load_or_compile_cubin",
    "plan_row_kernel",
    "scatter_residual_add",
    "scatter_residual_add_ref",
]

SOURCE_PATH = Path(__file__).with_name("batched_skip.cu")
DEFAULT_EPS = 1e-6

# Bumped when the way the cubin is built changes, so stale cache entries are not reused.
_CACHE_FORMAT = "1"
_NVRTC_OPTIONS = ("std=c++17",)

# Per-dtype kernel suffix and elements per 16-byte vector. Read-only views: no mutable state.
_DTYPE_SUFFIX = types.MappingProxyType(
    {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
)
_VEC = types.MappingProxyType({torch.float32: 4, torch.float16: 8, torch.bfloat16: 8})

_MAX_ROW_THREADS = 512  # the row kernels' __launch_bounds__
_CACHED_MAXV = 4  # vectors per thread the cached row kernels hold in registers
_PER_ROW_GRID_MIN_THREADS = 128  # from this block size on, launch one block per row
_COMPACT_THREADS = 1024
_COMPACT_CHUNK = 4 * _COMPACT_THREADS  # rows per compaction block
_INT32_MAX = 2**31 - 1

KERNEL_NAMES = ("adadepth_active_rows",) + tuple(
    f"adadepth_{op}_{dt}_{variant}"
    for op in ("gather_rmsnorm", "scatter_residual_add")
    for dt, vec in (("f32", 4), ("f16", 8), ("bf16", 8))
    for variant in (f"v{vec}", f"v{vec}_stream", "v1_stream")
)


# -------------------------------------------------------------------------------------------
# Argument checks (shared by the reference and the kernels, so both reject the same inputs).
# They run on every eager call, so the messages are only formatted once a check has failed.
# -------------------------------------------------------------------------------------------


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _desc(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} {tuple(x.shape)} stride {x.stride()} on {x.device}"


def _check_index_pair(active_idx: torch.Tensor, count: torch.Tensor, device: torch.device) -> int:
    if not (
        isinstance(active_idx, torch.Tensor)
        and active_idx.dtype == torch.int32
        and active_idx.dim() == 1
        and active_idx.is_contiguous()
        and active_idx.device == device
    ):
        raise ValueError(f"active_idx must be contiguous 1-D int32 on {device}: {_desc(active_idx)}")
    if not (
        isinstance(count, torch.Tensor)
        and count.dtype == torch.int32
        and count.numel() == 1
        and count.is_contiguous()
        and count.device == device
    ):
        raise ValueError(f"count must be one contiguous int32 on {device}: {_desc(count)}")
    n = active_idx.shape[0]
    _require(n <= _INT32_MAX, "active_idx is too long for int32 indexing")
    return n


def _rows_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """(..., D) -> (R, D) view with unit inner stride; ValueError if no such view exists."""
    if not (
        isinstance(x, torch.Tensor)
        and x.dim() >= 2
        and x.dtype in _DTYPE_SUFFIX
        and x.shape[-1] >= 1
        and (x.stride(-1) == 1 or x.shape[-1] == 1)
    ):
        raise ValueError(
            f"{name} must be float32/float16/bfloat16 (..., hidden) with unit stride in the "
            f"last dim: {_desc(x)}"
        )
    if x.dim() == 2:
        rows = x
    else:
        try:
            rows = x.view(-1, x.shape[-1])  # (R, D)
        except RuntimeError as exc:
            raise ValueError(f"{name} cannot be viewed as (rows, hidden): {_desc(x)}") from exc
    _require(rows.shape[0] <= _INT32_MAX, f"{name} has too many rows for int32 indexing")
    return rows


def _check_out(x: torch.Tensor | None, name: str, rows: int, like: torch.Tensor) -> None:
    if x is None:
        return
    if not (
        isinstance(x, torch.Tensor)
        and x.shape == (rows, like.shape[1])
        and x.dtype == like.dtype
        and x.device == like.device
        and (x.stride(1) == 1 or x.shape[1] == 1)
    ):
        raise ValueError(
            f"{name} must be {like.dtype} ({rows}, {like.shape[1]}) on {like.device} with unit "
            f"stride in the last dim: {_desc(x)}"
        )
    _require(x.data_ptr() != like.data_ptr() or x.numel() == 0, f"{name} must not alias hidden")


def _check_weight(w: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if not (
        isinstance(w, torch.Tensor)
        and w.shape == (like.shape[1],)
        and w.is_contiguous()
        and w.dtype == like.dtype
        and w.device == like.device
    ):
        raise ValueError(
            f"{name} must be contiguous {like.dtype} ({like.shape[1]},) on {like.device}: {_desc(w)}"
        )


def _check_eps(eps: float) -> float:
    _require(isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0, f"bad eps {eps!r}")
    return float(eps)


def _check_active_rows(
    row_depth: torch.Tensor,
    layer_rank: int,
    active_idx: torch.Tensor | None,
    count: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (
        isinstance(row_depth, torch.Tensor)
        and row_depth.dtype == torch.int32
        and row_depth.dim() == 1
        and row_depth.is_contiguous()
    ):
        raise ValueError(f"row_depth must be a contiguous 1-D int32 tensor: {_desc(row_depth)}")
    n = row_depth.shape[0]
    _require(n <= _INT32_MAX, "row_depth is too long for int32 indexing")
    if not (type(layer_rank) is int and -(2**31) <= layer_rank <= _INT32_MAX):
        raise ValueError(f"layer_rank must be an int in int32 range, got {layer_rank!r}")
    if active_idx is None:
        active_idx = torch.empty(n, dtype=torch.int32, device=row_depth.device)
    if count is None:
        count = torch.empty(1, dtype=torch.int32, device=row_depth.device)
    _require(
        _check_index_pair(active_idx, count, row_depth.device) == n,
        f"active_idx must have {n} entries, got {active_idx.numel()}",
    )
    return active_idx, count


class _GatherArgs(NamedTuple):
    hidden: torch.Tensor  # (R, D)
    active_idx: torch.Tensor  # (N,)
    count: torch.Tensor  # (1,)
    weight: torch.Tensor  # (D,)
    out: torch.Tensor  # (N, D)
    gathered: torch.Tensor | None  # (N, D)
    eps: float


def _check_gather(hidden, active_idx, count, weight, eps, out, gathered) -> _GatherArgs:
    h = _rows_view(hidden, "hidden")
    n = _check_index_pair(active_idx, count, h.device)
    _check_weight(weight, "weight", h)
    eps = _check_eps(eps)
    if out is None:
        out = h.new_empty((n, h.shape[1]))  # (N, D)
    else:
        _check_out(out, "out", n, h)
    if gathered is not None:
        _check_out(gathered, "gathered", n, h)
        _require(gathered.data_ptr() != out.data_ptr() or out.numel() == 0,
                 "gathered must not alias out")
    return _GatherArgs(h, active_idx, count, weight, out, gathered, eps)


class _ScatterArgs(NamedTuple):
    hidden: torch.Tensor  # (R, D)
    update: torch.Tensor  # (N, D)
    active_idx: torch.Tensor  # (N,)
    count: torch.Tensor  # (1,)
    scale: float
    next_weight: torch.Tensor | None  # (D,)
    normed_out: torch.Tensor | None  # (N, D)
    eps: float


def _check_scatter(
    hidden, update, active_idx, count, scale, next_weight, eps, normed_out
) -> _ScatterArgs:
    h = _rows_view(hidden, "hidden")
    n = _check_index_pair(active_idx, count, h.device)
    _require(update is not None, "update is required")
    _check_out(update, "update", n, h)
    if not (
        isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    eps = _check_eps(eps)
    if next_weight is None:
        _require(normed_out is None, "normed_out needs next_weight")
    else:
        _check_weight(next_weight, "next_weight", h)
        if normed_out is None:
            normed_out = h.new_empty((n, h.shape[1]))  # (N, D)
        else:
            _check_out(normed_out, "normed_out", n, h)
            _require(normed_out.data_ptr() != update.data_ptr() or update.numel() == 0,
                     "normed_out must not alias update")
    return _ScatterArgs(h, update, active_idx, count, float(scale), next_weight, normed_out, eps)


# -------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path)
# -------------------------------------------------------------------------------------------


def _rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm of (M, D) rows: fp32 statistics, rounded to x.dtype before the weight."""
    xf = x.float()  # (M, D)
    var = xf.pow(2).mean(-1, keepdim=True)  # (M, 1)
    normed = (xf * torch.rsqrt(var + eps)).to(x.dtype)  # (M, D)
    return (weight.float() * normed.float()).to(x.dtype)  # (M, D)


def _valid_prefix(active_idx: torch.Tensor, count: torch.Tensor, n_rows: int):
    """(positions i < count whose index is in range, those indices) as int64 tensors."""
    c = min(max(int(count.item()), 0), active_idx.numel())  # CPU path: a host read is fine
    idx = active_idx[:c].long()  # (c,)
    keep = (idx >= 0) & (idx < n_rows)  # (c,)
    pos = torch.nonzero(keep).flatten()  # (c',)
    return pos, idx[pos]


def active_rows_ref(
    row_depth: torch.Tensor,
    layer_rank: int,
    active_idx: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows with ``row_depth > layer_rank``: (int32 (N,) ascending then -1, int32 (1,) count)."""
    active_idx, count = _check_active_rows(row_depth, layer_rank, active_idx, count)
    rows = torch.nonzero(row_depth > layer_rank).flatten()  # (count,) ascending
    c = rows.numel()
    active_idx[:c] = rows.to(torch.int32)
    active_idx[c:] = -1
    count.fill_(c)
    return active_idx, count


def gather_rmsnorm_ref(
    hidden: torch.Tensor,
    active_idx: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    gathered: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[i] = rmsnorm(hidden[active_idx[i]]) * weight`` (and ``gathered[i]`` = the raw row)
    for ``i < count``; returns ``out`` (N, D), allocated when not given."""
    a = _check_gather(hidden, active_idx, count, weight, eps, out, gathered)
    pos, src = _valid_prefix(a.active_idx, a.count, a.hidden.shape[0])
    rows = a.hidden.index_select(0, src)  # (c', D)
    if a.gathered is not None:
        a.gathered.index_copy_(0, pos, rows)
    a.out.index_copy_(0, pos, _rmsnorm_ref(rows, a.weight, a.eps))
    return a.out


def scatter_residual_add_ref(
    hidden: torch.Tensor,
    update: torch.Tensor,
    active_idx: torch.Tensor,
    count: torch.Tensor,
    scale: float = 1.0,
    next_weight: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    normed_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """In place ``hidden[active_idx[i]] += scale * update[i]`` for ``i < count`` (indices must
    be unique). With ``next_weight`` also ``normed_out[i] = rmsnorm(new row) * next_weight``
    and returns ``normed_out`` (N, D), allocated when not given; else returns None."""
    a = _check_scatter(hidden, update, active_idx, count, scale, next_weight, eps, normed_out)
    pos, dst = _valid_prefix(a.active_idx, a.count, a.hidden.shape[0])
    h = a.hidden.index_select(0, dst).float()  # (c', D)
    u = a.update.index_select(0, pos).float()  # (c', D)
    new = (h + u * a.scale).to(a.hidden.dtype)  # (c', D), rounds like the kernel
    a.hidden.index_copy_(0, dst, new)
    if a.next_weight is None:
        return None
    a.normed_out.index_copy_(0, pos, _rmsnorm_ref(new, a.next_weight, a.eps))
    return a.normed_out


# -------------------------------------------------------------------------------------------
# Compilation (NVRTC through cuda-python) and the on-disk cubin cache
# -------------------------------------------------------------------------------------------


def _cuda_core():
    """(Program, ProgramOptions) from cuda.core, or cuda.core.experimental before 0.4."""
    try:
        from cuda.core import Program, ProgramOptions
    except ImportError:
        from cuda.core.experimental import Program, ProgramOptions
    return Program, ProgramOptions


def _nvrtc_version() -> str:
    try:
        from cuda.bindings import nvrtc

        err, major, minor = nvrtc.nvrtcVersion()
    except Exception:  # no bindings or no NVRTC library: the compile will say so
        return "unknown"
    return f"{major}.{minor}" if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else "unknown"


def _compile_with_nvrtc_bindings(source: str, arch: str) -> bytes:
    """Fallback when cuda.core is missing: the raw NVRTC bindings."""
    from cuda.bindings import nvrtc

    def check(result):
        err = result[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC failed: {err}")
        return result[1:]

    (prog,) = check(nvrtc.nvrtcCreateProgram(source.encode(), b"batched_skip.cu", 0, [], []))
    try:
        opts = [f"-arch={arch}".encode()] + [f"-{o}".encode() for o in _NVRTC_OPTIONS]
        err = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            (size,) = check(nvrtc.nvrtcGetProgramLogSize(prog))
            log = b" " * size
            check(nvrtc.nvrtcGetProgramLog(prog, log))
            raise RuntimeError(f"NVRTC compile of {SOURCE_PATH.name} failed:\n{log.decode()}")
        (size,) = check(nvrtc.nvrtcGetCUBINSize(prog))
        cubin = b" " * size
        check(nvrtc.nvrtcGetCUBIN(prog, cubin))
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(arch: str, source: str | None = None) -> bytes:
    """Compile the kernels to a cubin for ``arch`` (e.g. "sm_90") with NVRTC; no GPU needed."""
    _require(arch.startswith("sm_") and arch[3:].rstrip("a").isdigit(), f"bad arch {arch!r}")
    source = SOURCE_PATH.read_text() if source is None else source
    try:
        Program, ProgramOptions = _cuda_core()
    except ImportError:
        return _compile_with_nvrtc_bindings(source, arch)
    options = ProgramOptions(arch=arch, std="c++17")
    code = Program(source, "c++", options=options).compile("cubin").code
    if isinstance(code, (bytes, bytearray, memoryview)):
        return bytes(code)
    return _compile_with_nvrtc_bindings(source, arch)  # a cuda.core that hands back no bytes


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "adadepth" / "kernels"


def load_or_compile_cubin(arch: str, cache_dir: Path | str | None = None) -> bytes:
    """The cubin for ``arch``, from ``cache_dir`` (default ~/.cache/adadepth/kernels) when the
    source, arch, options and NVRTC version match, else compiled and stored there."""
    source = SOURCE_PATH.read_text()
    key = hashlib.sha256(
        "\0".join((_CACHE_FORMAT, source, arch, *_NVRTC_OPTIONS, _nvrtc_version())).encode()
    ).hexdigest()[:32]
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{key}.cubin"
    try:
        return path.read_bytes()
    except OSError:
        pass
    cubin = compile_cubin(arch, source)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:
        pass  # an unwritable cache only costs a recompile next time
    return cubin


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
    _require(1 <= vectors_per_thread <= _CACHED_MAXV, f"vectors_per_thread must be 1..{_CACHED_MAXV}")
    vec = _VEC[dtype]
    dt = _DTYPE_SUFFIX[dtype]
    if aligned and dim % vec == 0:
        nvec = dim // vec
        if nvec <= _CACHED_MAXV * _MAX_ROW_THREADS:
            # Up to 4 vectors per thread: several 16-byte loads in flight per thread while
            # blocks stay small enough for many to share an SM (on an H200, 4 beat 2 and 1
            # for 16-bit rows of 576 to 4096 and tied for fp32).
            threads = min(
                _MAX_ROW_THREADS, max(32, _round_up(-(-nvec // vectors_per_thread), 32))
            )
            return RowKernelPlan(f"{dt}_v{vec}", threads)
        return RowKernelPlan(f"{dt}_v{vec}_stream", _MAX_ROW_THREADS)
    threads = min(_MAX_ROW_THREADS, max(32, _round_up(-(-dim // 4), 32)))
    return RowKernelPlan(f"{dt}_v1_stream", threads)


# Kernel parameter blocks, laid out like the kernels' C parameter lists in batched_skip.cu
# (keep them in the same order with the same C types). ctypes uses the C ABI's natural
# alignment, so each field's offset is where cuLaunchKernel must find that argument.
def _params_struct(name: str, fields: list[tuple[str, type]]) -> type:
    cls = type(name, (ctypes.Structure,), {"_fields_": fields})
    cls.offsets = tuple(getattr(cls, f).offset for f, _ in fields)
    return cls


_ActiveRowsParams = _params_struct("_ActiveRowsParams", [
    ("row_depth", ctypes.c_void_p), ("n", ctypes.c_int32), ("layer_rank", ctypes.c_int32),
    ("chunk", ctypes.c_int32), ("active_idx", ctypes.c_void_p), ("count", ctypes.c_void_p),
])
_GatherParams = _params_struct("_GatherParams", [
    ("hidden", ctypes.c_void_p), ("ld_hidden", ctypes.c_int64), ("n_rows", ctypes.c_int32),
    ("active_idx", ctypes.c_void_p), ("n_idx", ctypes.c_int32), ("count", ctypes.c_void_p),
    ("weight", ctypes.c_void_p), ("out", ctypes.c_void_p), ("ld_out", ctypes.c_int64),
    ("gathered", ctypes.c_void_p), ("ld_gathered", ctypes.c_int64), ("dim", ctypes.c_int32),
    ("eps", ctypes.c_float),
])
_ScatterParams = _params_struct("_ScatterParams", [
    ("hidden", ctypes.c_void_p), ("ld_hidden", ctypes.c_int64), ("n_rows", ctypes.c_int32),
    ("update", ctypes.c_void_p), ("ld_update", ctypes.c_int64),
    ("active_idx", ctypes.c_void_p), ("n_idx", ctypes.c_int32), ("count", ctypes.c_void_p),
    ("scale", ctypes.c_float), ("next_weight", ctypes.c_void_p),
    ("normed_out", ctypes.c_void_p), ("ld_normed", ctypes.c_int64), ("dim", ctypes.c_int32),
    ("eps", ctypes.c_float),
])


# -------------------------------------------------------------------------------------------
# CUDA path
# -------------------------------------------------------------------------------------------


def _cuda_driver():
    from cuda.bindings import driver

    return driver


def _check_cu(driver, result):
    """Raise on a CUresult error; return the remaining outputs of a cuda.bindings call."""
    err = result[0] if isinstance(result, tuple) else result
    if err != driver.CUresult.CUDA_SUCCESS:
        name = driver.cuGetErrorName(err)
        raise RuntimeError(f"CUDA driver error {err}: {name[1] if name[0] == 0 else '?'}")
    rest = result[1:] if isinstance(result, tuple) else ()
    return rest[0] if len(rest) == 1 else rest


class BatchedSkipKernels:
    """The kernels compiled and loaded for one CUDA device.

    Launches go to ``torch.cuda.current_stream(device)``, so they order with the surrounding
    PyTorch work and can be captured in CUDA graphs. Prefer ``get_kernels(device)``, which
    keeps one instance per device. ``vectors_per_thread`` and ``persistent`` (grid of resident
    blocks looping over rows, or one block per row; None picks by block size) tune the row
    kernels' launch shape only, for benchmarks/gpu_check.py's sweep.
    """

    def __init__(
        self,
        device: torch.device | int | str | None = None,
        cache_dir: Path | str | None = None,
        vectors_per_thread: int = 4,
        persistent: bool | None = None,
    ):
        device = torch.device("cuda", torch.cuda.current_device()) if device is None else device
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        _require(device.type == "cuda", f"BatchedSkipKernels needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        _require(1 <= vectors_per_thread <= _CACHED_MAXV, f"vectors_per_thread must be 1..{_CACHED_MAXV}")
        self.device = device
        self.vectors_per_thread = vectors_per_thread
        self.persistent = persistent
        props = torch.cuda.get_device_properties(device)
        self.arch = f"sm_{props.major}{props.minor}"
        self.num_sms = props.multi_processor_count
        self.cubin = load_or_compile_cubin(self.arch, cache_dir)

        d = self._driver = _cuda_driver()
        self._success = d.CUresult.CUDA_SUCCESS
        _check_cu(d, d.cuInit(0))
        cu_device = _check_cu(d, d.cuDeviceGet(device.index))
        # The primary context is the one PyTorch's runtime uses, so module and tensors match.
        self._ctx = _check_cu(d, d.cuDevicePrimaryCtxRetain(cu_device))
        self._ctx_handle = int(self._ctx)
        pushed = self._push_ctx()
        try:
            self._module = _check_cu(d, d.cuModuleLoadData(self.cubin))
            self._functions = types.MappingProxyType({
                n: _check_cu(d, d.cuModuleGetFunction(self._module, n.encode()))
                for n in KERNEL_NAMES
            })
            # Resident blocks per SM of each row kernel at each block size it may get.
            self._resident = types.MappingProxyType({
                (n, t): _check_cu(
                    d, d.cuOccupancyMaxActiveBlocksPerMultiprocessor(self._functions[n], t, 0)
                )
                for n in KERNEL_NAMES[1:]
                for t in range(32, _MAX_ROW_THREADS + 1, 32)
            })
        finally:
            if pushed:
                self._pop_ctx()

    # The current context differs from ours only when several GPUs are in use (or on a thread
    # where nothing has touched CUDA yet); switch only then.
    def _push_ctx(self) -> bool:
        current = _check_cu(self._driver, self._driver.cuCtxGetCurrent())
        if int(current) == self._ctx_handle:
            return False
        _check_cu(self._driver, self._driver.cuCtxPushCurrent(self._ctx))
        return True

    def _pop_ctx(self) -> None:
        _check_cu(self._driver, self._driver.cuCtxPopCurrent())

    def _launch(self, name: str, grid: int, block: int, params: ctypes.Structure) -> None:
        # cuLaunchKernel's kernelParams: an array of pointers to each argument's value.
        base = ctypes.addressof(params)
        offsets = type(params).offsets
        argv = (ctypes.c_void_p * len(offsets))(*[base + o for o in offsets])
        stream = torch.cuda.current_stream(self.device).cuda_stream
        pushed = self._push_ctx()
        try:
            err = self._driver.cuLaunchKernel(
                self._functions[name], grid, 1, 1, block, 1, 1, 0, stream,
                ctypes.addressof(argv), 0,
            )
            if err[0] != self._success:
                _check_cu(self._driver, err)
        finally:
            if pushed:
                self._pop_ctx()

    def _check_device(self, t: torch.Tensor) -> None:
        if not (isinstance(t, torch.Tensor) and t.device == self.device):
            raise ValueError(f"tensors must be on {self.device}: {_desc(t)}")

    def _row_launch(self, op: str, dtype, dim, ptrs, strides, n_idx: int, params) -> None:
        plan = plan_row_kernel(dtype, dim, ptrs, strides, self.vectors_per_thread)
        name = f"adadepth_{op}_{plan.suffix}"
        persistent = self.persistent
        if persistent is None:
            # On an H200, a grid of resident blocks looping over rows beat one block per row
            # by ~35 % for 1-warp blocks (576-wide bf16 rows); from 4-warp blocks on, one
            # block per row won by 5-10 % (the hardware balances the rows better).
            persistent = plan.threads < _PER_ROW_GRID_MIN_THREADS
        grid = n_idx  # one block per possible row; those past count exit at once
        if persistent:  # as many blocks as fit on the GPU at once, looping over rows
            grid = min(n_idx, max(1, self._resident[(name, plan.threads)]) * self.num_sms)
        self._launch(name, max(1, grid), plan.threads, params)

    def active_rows(
        self,
        row_depth: torch.Tensor,
        layer_rank: int,
        active_idx: torch.Tensor | None = None,
        count: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel version of ``active_rows_ref``."""
        self._check_device(row_depth)
        active_idx, count = _check_active_rows(row_depth, layer_rank, active_idx, count)
        n = row_depth.shape[0]
        grid = max(1, -(-n // _COMPACT_CHUNK))  # one block even for n == 0: it writes count
        params = _ActiveRowsParams(
            row_depth.data_ptr(), n, layer_rank, _COMPACT_CHUNK,
            active_idx.data_ptr(), count.data_ptr(),
        )
        self._launch("adadepth_active_rows", grid, _COMPACT_THREADS, params)
        return active_idx, count

    def gather_rmsnorm(
        self,
        hidden: torch.Tensor,
        active_idx: torch.Tensor,
        count: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        out: torch.Tensor | None = None,
        gathered: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Kernel version of ``gather_rmsnorm_ref``."""
        self._check_device(hidden)
        a = _check_gather(hidden, active_idx, count, weight, eps, out, gathered)
        h, o, g = a.hidden, a.out, a.gathered
        n_idx, dim = o.shape
        if n_idx == 0:
            return o
        ld_h, ld_o, ld_g = h.stride(0), o.stride(0), g.stride(0) if g is not None else 0
        ptr_h, ptr_w, ptr_o = h.data_ptr(), a.weight.data_ptr(), o.data_ptr()
        ptr_g = g.data_ptr() if g is not None else 0
        params = _GatherParams(
            ptr_h, ld_h, h.shape[0], a.active_idx.data_ptr(), n_idx, a.count.data_ptr(),
            ptr_w, ptr_o, ld_o, ptr_g or None, ld_g, dim, a.eps,
        )
        self._row_launch(
            "gather_rmsnorm", h.dtype, dim, (ptr_h, ptr_w, ptr_o, ptr_g), (ld_h, ld_o, ld_g),
            n_idx, params,
        )
        return o

    def scatter_residual_add(
        self,
        hidden: torch.Tensor,
        update: torch.Tensor,
        active_idx: torch.Tensor,
        count: torch.Tensor,
        scale: float = 1.0,
        next_weight: torch.Tensor | None = None,
        eps: float = DEFAULT_EPS,
        normed_out: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Kernel version of ``scatter_residual_add_ref``."""
        self._check_device(hidden)
        a = _check_scatter(hidden, update, active_idx, count, scale, next_weight, eps, normed_out)
        h, u, w, no = a.hidden, a.update, a.next_weight, a.normed_out
        n_idx, dim = u.shape
        if n_idx == 0:
            return no
        ld_h, ld_u, ld_n = h.stride(0), u.stride(0), no.stride(0) if no is not None else 0
        ptr_h, ptr_u = h.data_ptr(), u.data_ptr()
        ptr_w = w.data_ptr() if w is not None else 0
        ptr_n = no.data_ptr() if no is not None else 0
        params = _ScatterParams(
            ptr_h, ld_h, h.shape[0], ptr_u, ld_u, a.active_idx.data_ptr(), n_idx,
            a.count.data_ptr(), a.scale, ptr_w or None, ptr_n or None, ld_n, dim, a.eps,
        )
        self._row_launch(
            "scatter_residual_add", h.dtype, dim, (ptr_h, ptr_u, ptr_w, ptr_n),
            (ld_h, ld_u, ld_n), n_idx, params,
        )
        return no


@functools.lru_cache(maxsize=None)
def _kernels_for_index(index: int) -> BatchedSkipKernels:
    return BatchedSkipKernels(index)


def get_kernels(device: torch.device | int | None = None) -> BatchedSkipKernels:
    """The shared ``BatchedSkipKernels`` of a CUDA device (compiled or loaded once)."""
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        device = torch.device(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
    return _kernels_for_index(index)


# -------------------------------------------------------------------------------------------
# Public API: dispatch on the tensors' device
# -------------------------------------------------------------------------------------------


def active_rows(
    row_depth: torch.Tensor,
    layer_rank: int,
    active_idx: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Active rows (``row_depth > layer_rank``) of a batch for one layer.

    Returns ``(active_idx, count)``: int32 (N,) with the active row indices ascending in
    ``[:count]`` and -1 after, and int32 (1,) on the same device. Pass preallocated
    ``active_idx``/``count`` to write into them (needed for CUDA graphs).
    """
    if isinstance(row_depth, torch.Tensor) and row_depth.is_cuda:
        return get_kernels(row_depth.device).active_rows(row_depth, layer_rank, active_idx, count)
    return active_rows_ref(row_depth, layer_rank, active_idx, count)


def gather_rmsnorm(
    hidden: torch.Tensor,
    active_idx: torch.Tensor,
    count: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    gathered: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[i] = rmsnorm(hidden[active_idx[i]]) * weight`` for ``i < count``.

    ``hidden`` is (..., D) (viewed as rows); ``out`` and ``gathered`` are (N, D) with
    N = len(active_idx); ``gathered[i]`` gets the raw row when given. Returns ``out``.
    """
    if isinstance(hidden, torch.Tensor) and hidden.is_cuda:
        return get_kernels(hidden.device).gather_rmsnorm(
            hidden, active_idx, count, weight, eps, out, gathered
        )
    return gather_rmsnorm_ref(hidden, active_idx, count, weight, eps, out, gathered)


def scatter_residual_add(
    hidden: torch.Tensor,
    update: torch.Tensor,
    active_idx: torch.Tensor,
    count: torch.Tensor,
    scale: float = 1.0,
    next_weight: torch.Tensor | None = None,
    eps: float = DEFAULT_EPS,
    normed_out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """In place ``hidden[active_idx[i]] += scale * update[i]`` for ``i < count``.

    ``update`` is (N, D). With ``next_weight``, also writes and returns
    ``normed_out[i] = rmsnorm(new hidden row) * next_weight`` (N, D); otherwise returns None.
    Inactive rows of ``hidden`` are not touched. Indices in ``active_idx[:count]`` must be unique.
    """
    if isinstance(hidden, torch.Tensor) and hidden.is_cuda:
        return get_kernels(hidden.device).scatter_residual_add(
            hidden, update, active_idx, count, scale, next_weight, eps, normed_out
        )
    return scatter_residual_add_ref(
        hidden, update, active_idx, count, scale, next_weight, eps, normed_out
    )
