"""Custom kernels and their PyTorch references: CUDA ones compiled at run time with NVRTC, CPU
ones compiled once per machine with torch.utils.cpp_extension."""

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
from .cpu_ops import load_cpu_ops
from .layer_ops import LayerOps, add_rms_norm_ref, rms_norm_ref, rope_write_kv_ref, silu_and_mul_ref
from .paged_attention import paged_decode_attention_ref

__all__ = [
    "BatchedSkipKernels",
    "active_rows",
    "active_rows_ref",
    "gather_rmsnorm",
    "gather_rmsnorm_ref",
    "get_kernels",
    "LayerOps",
    "add_rms_norm_ref",
    "load_cpu_ops",
    "paged_decode_attention_ref",
    "rms_norm_ref",
    "rope_write_kv_ref",
    "silu_and_mul_ref",
    "scatter_residual_add",
    "scatter_residual_add_ref",
]
