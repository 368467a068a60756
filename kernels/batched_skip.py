"""Batched-skip kernels: run one layer over only the active rows of a mixed-depth batch.

A row (a token) with depth ``d`` runs layer ``l`` iff ``d > rank[l]``. Per layer the engine calls

    active_idx, count = active_rows(row_depth, rank[l])
    x = gather_rmsnorm(hidden, active_idx, count, input_norm_weight, eps)
    ...                                       # attention / MLP on x[:count]
    scatter_residual_add(hidden, update, active_idx, count, scale, next_weight, eps, normed_out)

``count`` stays a 1-element int32 tensor on the device, so the CUDA path needs no host sync and
can be captured in a CUDA graph. Each public function dispatches on the tensors' device: CUDA
tensors go to the NVRTC-compiled kernels of ``batched_skip.cu`` (built by ``nvrtc_build.py``),
CPU tensors to the ``*_ref`` PyTorch reference in ``batched_skip_ref.py``, which has the same
semantics.

Semantics shared by both paths:

* ``active_idx`` (int32, (N,)): the active rows in ascending order in ``[:count]``, -1 after.
* Output buffers have ``len(active_idx)`` rows; rows at or after ``count`` are never written.
* Entries of ``active_idx[:count]`` outside ``[0, rows)`` are skipped (nothing read or written).
* RMSNorm is Hugging Face's Llama/Qwen2 one, in fp32:
  ``w * to_dtype(x * rsqrt(mean(x**2) + eps))`` with the product rounded to the dtype again.
* The residual update rounds like torch: ``to_dtype(h + u * scale)``, multiply then add.
"""

from __future__ import annotations

import torch

from .batched_skip_kernels import BatchedSkipKernels, get_kernels
from .batched_skip_ref import (
    DEFAULT_EPS,
    active_rows_ref,
    gather_rmsnorm_ref,
    scatter_residual_add_ref,
)
from .launch_plan import KERNEL_NAMES, plan_row_kernel
from .nvrtc_build import SOURCE_PATH, compile_cubin, load_or_compile_cubin

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
