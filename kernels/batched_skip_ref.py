"""The batched-skip ops' PyTorch reference, and the argument checks it shares with the kernels.

The reference is what the engine runs on CPU and what the tests and `benchmarks/gpu_check.py`
use as the oracle; `batched_skip.py` dispatches CUDA tensors to the kernels, which must match it
(semantics in that module's docstring). Both paths run the same checks, so both reject the
same inputs with the same messages.
"""

from __future__ import annotations

import math
import types
from typing import NamedTuple

import torch

DEFAULT_EPS = 1e-6
INT32_MAX = 2**31 - 1
# Per-dtype kernel suffix. A read-only view: no mutable state.
DTYPE_SUFFIX = types.MappingProxyType({torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"})


# -------------------------------------------------------------------------------------------
# Argument checks (shared by the reference and the kernels, so both reject the same inputs).
# They run on every eager call, so the messages are only formatted once a check has failed.
# -------------------------------------------------------------------------------------------


def require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def describe(x) -> str:
    if not isinstance(x, torch.Tensor):
        return type(x).__name__
    return f"{x.dtype} {tuple(x.shape)} stride {x.stride()} on {x.device}"


def check_index_pair(active_idx: torch.Tensor, count: torch.Tensor, device: torch.device) -> int:
    if not (
        isinstance(active_idx, torch.Tensor)
        and active_idx.dtype == torch.int32
        and active_idx.dim() == 1
        and active_idx.is_contiguous()
        and active_idx.device == device
    ):
        raise ValueError(f"active_idx must be contiguous 1-D int32 on {device}: {describe(active_idx)}")
    if not (
        isinstance(count, torch.Tensor)
        and count.dtype == torch.int32
        and count.numel() == 1
        and count.is_contiguous()
        and count.device == device
    ):
        raise ValueError(f"count must be one contiguous int32 on {device}: {describe(count)}")
    n = active_idx.shape[0]
    require(n <= INT32_MAX, "active_idx is too long for int32 indexing")
    return n


def rows_view(x: torch.Tensor, name: str) -> torch.Tensor:
    """(..., D) -> (R, D) view with unit inner stride; ValueError if no such view exists."""
    if not (
        isinstance(x, torch.Tensor)
        and x.dim() >= 2
        and x.dtype in DTYPE_SUFFIX
        and x.shape[-1] >= 1
        and (x.stride(-1) == 1 or x.shape[-1] == 1)
    ):
        raise ValueError(
            f"{name} must be float32/float16/bfloat16 (..., hidden) with unit stride in the "
            f"last dim: {describe(x)}"
        )
    if x.dim() == 2:
        rows = x
    else:
        try:
            rows = x.view(-1, x.shape[-1])  # (R, D)
        except RuntimeError as exc:
            raise ValueError(f"{name} cannot be viewed as (rows, hidden): {describe(x)}") from exc
    require(rows.shape[0] <= INT32_MAX, f"{name} has too many rows for int32 indexing")
    return rows


def check_out(x: torch.Tensor | None, name: str, rows: int, like: torch.Tensor) -> None:
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
            f"stride in the last dim: {describe(x)}"
        )
    require(x.data_ptr() != like.data_ptr() or x.numel() == 0, f"{name} must not alias hidden")


def check_weight(w: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if not (
        isinstance(w, torch.Tensor)
        and w.shape == (like.shape[1],)
        and w.is_contiguous()
        and w.dtype == like.dtype
        and w.device == like.device
    ):
        raise ValueError(
            f"{name} must be contiguous {like.dtype} ({like.shape[1]},) on {like.device}: {describe(w)}"
        )


def check_eps(eps: float) -> float:
    require(isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0, f"bad eps {eps!r}")
    return float(eps)


def check_active_rows(
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
        raise ValueError(f"row_depth must be a contiguous 1-D int32 tensor: {describe(row_depth)}")
    n = row_depth.shape[0]
    require(n <= INT32_MAX, "row_depth is too long for int32 indexing")
    if not (type(layer_rank) is int and -(2**31) <= layer_rank <= INT32_MAX):
        raise ValueError(f"layer_rank must be an int in int32 range, got {layer_rank!r}")
    if active_idx is None:
        active_idx = torch.empty(n, dtype=torch.int32, device=row_depth.device)
    if count is None:
        count = torch.empty(1, dtype=torch.int32, device=row_depth.device)
    require(
        check_index_pair(active_idx, count, row_depth.device) == n,
        f"active_idx must have {n} entries, got {active_idx.numel()}",
    )
    return active_idx, count


class GatherArgs(NamedTuple):
    hidden: torch.Tensor  # (R, D)
    active_idx: torch.Tensor  # (N,)
    count: torch.Tensor  # (1,)
    weight: torch.Tensor  # (D,)
    out: torch.Tensor  # (N, D)
    gathered: torch.Tensor | None  # (N, D)
    eps: float


def check_gather(hidden, active_idx, count, weight, eps, out, gathered) -> GatherArgs:
    h = rows_view(hidden, "hidden")
    n = check_index_pair(active_idx, count, h.device)
    check_weight(weight, "weight", h)
    eps = check_eps(eps)
    if out is None:
        out = h.new_empty((n, h.shape[1]))  # (N, D)
    else:
        check_out(out, "out", n, h)
    if gathered is not None:
        check_out(gathered, "gathered", n, h)
        require(gathered.data_ptr() != out.data_ptr() or out.numel() == 0,
                 "gathered must not alias out")
    return GatherArgs(h, active_idx, count, weight, out, gathered, eps)


class ScatterArgs(NamedTuple):
    hidden: torch.Tensor  # (R, D)
    update: torch.Tensor  # (N, D)
    active_idx: torch.Tensor  # (N,)
    count: torch.Tensor  # (1,)
    scale: float
    next_weight: torch.Tensor | None  # (D,)
    normed_out: torch.Tensor | None  # (N, D)
    eps: float


def check_scatter(
    hidden, update, active_idx, count, scale, next_weight, eps, normed_out
) -> ScatterArgs:
    h = rows_view(hidden, "hidden")
    n = check_index_pair(active_idx, count, h.device)
    require(update is not None, "update is required")
    check_out(update, "update", n, h)
    if not (
        isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)
    ):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    eps = check_eps(eps)
    if next_weight is None:
        require(normed_out is None, "normed_out needs next_weight")
    else:
        check_weight(next_weight, "next_weight", h)
        if normed_out is None:
            normed_out = h.new_empty((n, h.shape[1]))  # (N, D)
        else:
            check_out(normed_out, "normed_out", n, h)
            require(normed_out.data_ptr() != update.data_ptr() or update.numel() == 0,
                     "normed_out must not alias update")
    return ScatterArgs(h, update, active_idx, count, float(scale), next_weight, normed_out, eps)


# -------------------------------------------------------------------------------------------
# PyTorch reference (the CPU path)
# -------------------------------------------------------------------------------------------


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF Llama RMSNorm of (M, D) rows: fp32 statistics, rounded to x.dtype before the weight."""
    xf = x.float()  # (M, D)
    var = xf.pow(2).mean(-1, keepdim=True)  # (M, 1)
    normed = (xf * torch.rsqrt(var + eps)).to(x.dtype)  # (M, D)
    return (weight.float() * normed.float()).to(x.dtype)  # (M, D)


def valid_prefix(active_idx: torch.Tensor, count: torch.Tensor, n_rows: int):
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
    active_idx, count = check_active_rows(row_depth, layer_rank, active_idx, count)
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
    a = check_gather(hidden, active_idx, count, weight, eps, out, gathered)
    pos, src = valid_prefix(a.active_idx, a.count, a.hidden.shape[0])
    rows = a.hidden.index_select(0, src)  # (c', D)
    if a.gathered is not None:
        a.gathered.index_copy_(0, pos, rows)
    a.out.index_copy_(0, pos, rmsnorm_ref(rows, a.weight, a.eps))
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
    a = check_scatter(hidden, update, active_idx, count, scale, next_weight, eps, normed_out)
    pos, dst = valid_prefix(a.active_idx, a.count, a.hidden.shape[0])
    h = a.hidden.index_select(0, dst).float()  # (c', D)
    u = a.update.index_select(0, pos).float()  # (c', D)
    new = (h + u * a.scale).to(a.hidden.dtype)  # (c', D), rounds like the kernel
    a.hidden.index_copy_(0, dst, new)
    if a.next_weight is None:
        return None
    a.normed_out.index_copy_(0, pos, rmsnorm_ref(new, a.next_weight, a.eps))
    return a.normed_out
