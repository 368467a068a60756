"""Custom CUDA kernels (compiled at run time with NVRTC) and their PyTorch references."""

# Relative, so that the folder stays importable even when a tool run from the repository root
# finds it as a top-level `kernels` (transformers probes for a PyPI package of that name).
from .batched_skip import (
    BatchedSkipKernels,
    active_rows,
    active_rows_ref,
    gather_rmsnorm,
    gather_rmsnorm_ref,
    get_kernels,
    scatter_residual_add,
    scatter_residual_add_ref,
)

__all__ = [
    "BatchedSkipKernels",
    "active_rows",
    "active_rows_ref",
    "gather_rmsnorm",
    "gather_rmsnorm_ref",
    "get_kernels",
    "scatter_residual_add",
    "scatter_residual_add_ref",
]
