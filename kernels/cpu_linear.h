// Argument handling shared by the matmul kernels (skinny_linear_cpu.cpp, paired_linear_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <optional>

namespace adadepth_cpu {

// The optional bias of a y (M, N) product as a pointer to N values of the product's dtype T, nullptr
// when there is none; `keep` holds the contiguous tensor the pointer reads.
template <typename T>
inline const T* bias_ptr(const std::optional<at::Tensor>& bias, int64_t N, at::Tensor& keep) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->scalar_type() == c10::CppTypeToScalarType<T>::value && bias->numel() == N,
              "bias must be (N,) of the product's dtype");
  keep = bias->contiguous();
  return keep.data_ptr<T>();
}

}  // namespace adadepth_cpu
