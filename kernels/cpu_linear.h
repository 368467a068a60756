// Argument handling shared by the bf16 matmul kernels (skinny_linear_cpu.cpp, paired_linear_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <optional>

namespace adadepth_cpu {

// The optional bias of a y (M, N) product as a pointer to N bf16 values, nullptr when there is none;
// `keep` holds the contiguous tensor the pointer reads.
inline const c10::BFloat16* bf16_bias(const std::optional<at::Tensor>& bias, int64_t N, at::Tensor& keep) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == at::kBFloat16 && bias->numel() == N, "bias must be (N,) bfloat16");
  keep = bias->contiguous();
  return keep.data_ptr<c10::BFloat16>();
}

}  // namespace adadepth_cpu
