"""Custom kernels and their PyTorch references: CUDA ones compiled at run time with NVRTC, a CPU
one compiled once per machine with torch.utils.cpp_extension."""

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
from .paged_attention import load_cpu_paged_attention, paged_decode_attention_ref

__all__ = [
    "BatchedSkipKernels",
    "active_rows",
    "active_rows_ref",
    "gather_rmsnorm",
    "gather_rmsnorm_ref",
    "get_kernels",
    "load_cpu_paged_attention",
    "paged_decode_attention_ref",
    "scatter_residual_add",
    "scatter_residual_add_ref",
]
