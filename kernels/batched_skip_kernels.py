"""`BatchedSkipKernels`: the batched-skip kernels compiled (NVRTC) and loaded for one CUDA
device, launched through the CUDA driver API (cuda-python) on PyTorch's current stream with the
tensors' pointers, after the same argument checks as the reference. `get_kernels(device)` keeps
one instance per device."""

from __future__ import annotations

import ctypes
import functools
import types
from pathlib import Path

import torch

from .batched_skip_ref import (
    DEFAULT_EPS,
    check_active_rows,
    check_gather,
    check_scatter,
    describe,
    require,
)
from .launch_plan import (
    CACHED_MAXV,
    COMPACT_CHUNK,
    COMPACT_THREADS,
    KERNEL_NAMES,
    MAX_ROW_THREADS,
    PER_ROW_GRID_MIN_THREADS,
    ActiveRowsParams,
    GatherParams,
    ScatterParams,
    plan_row_kernel,
)
from .nvrtc_build import load_or_compile_cubin


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
        require(device.type == "cuda", f"BatchedSkipKernels needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        require(1 <= vectors_per_thread <= CACHED_MAXV, f"vectors_per_thread must be 1..{CACHED_MAXV}")
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
                for t in range(32, MAX_ROW_THREADS + 1, 32)
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
            raise ValueError(f"tensors must be on {self.device}: {describe(t)}")

    def _row_launch(self, op: str, dtype, dim, ptrs, strides, n_idx: int, params) -> None:
        plan = plan_row_kernel(dtype, dim, ptrs, strides, self.vectors_per_thread)
        name = f"adadepth_{op}_{plan.suffix}"
        persistent = self.persistent
        if persistent is None:
            # On an H200, a grid of resident blocks looping over rows beat one block per row
            # by ~35 % for 1-warp blocks (576-wide bf16 rows); from 4-warp blocks on, one
            # block per row won by 5-10 % (the hardware balances the rows better).
            persistent = plan.threads < PER_ROW_GRID_MIN_THREADS
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
        active_idx, count = check_active_rows(row_depth, layer_rank, active_idx, count)
        n = row_depth.shape[0]
        grid = max(1, -(-n // COMPACT_CHUNK))  # one block even for n == 0: it writes count
        params = ActiveRowsParams(
            row_depth.data_ptr(), n, layer_rank, COMPACT_CHUNK,
            active_idx.data_ptr(), count.data_ptr(),
        )
        self._launch("adadepth_active_rows", grid, COMPACT_THREADS, params)
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
        a = check_gather(hidden, active_idx, count, weight, eps, out, gathered)
        h, o, g = a.hidden, a.out, a.gathered
        n_idx, dim = o.shape
        if n_idx == 0:
            return o
        ld_h, ld_o, ld_g = h.stride(0), o.stride(0), g.stride(0) if g is not None else 0
        ptr_h, ptr_w, ptr_o = h.data_ptr(), a.weight.data_ptr(), o.data_ptr()
        ptr_g = g.data_ptr() if g is not None else 0
        params = GatherParams(
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
        a = check_scatter(hidden, update, active_idx, count, scale, next_weight, eps, normed_out)
        h, u, w, no = a.hidden, a.update, a.next_weight, a.normed_out
        n_idx, dim = u.shape
        if n_idx == 0:
            return no
        ld_h, ld_u, ld_n = h.stride(0), u.stride(0), no.stride(0) if no is not None else 0
        ptr_h, ptr_u = h.data_ptr(), u.data_ptr()
        ptr_w = w.data_ptr() if w is not None else 0
        ptr_n = no.data_ptr() if no is not None else 0
        params = ScatterParams(
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
