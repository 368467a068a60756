// The small ops of a decoder layer, fused, on CPU (float32, bfloat16, float64).
//
// Why: in a decode step each layer's matmuls touch a few rows, so the layer's time outside them
// is per-op overhead, not arithmetic. Composed from PyTorch ops, RMSNorm, RoPE, the KV-cache write
// and SiLU-and-multiply took ~30 small ops per layer (benchmarks/results/step_profile_before.json
// has their counts and times). Here each is one op with one pass over its rows.
//
// Semantics (the PyTorch references in layer_ops.py compute the same; math in float32, or
// float64 for float64 tensors, rounded once to the tensor's dtype):
//   rms_norm(x (N, D), w (D,), eps)            -> x * rsqrt(mean(x^2) + eps) * w
//   add_rms_norm(h (N, D), delta (N, D), w, eps) -> (h + delta, rms_norm(h + delta)); the norm
//                                                   reads the sum as rounded to the dtype
//   rope_write_kv(qkv (N, (H + 2 Hkv) Dh), cos, sin (N, Dh/2) float32, k/v_cache (slots, Hkv, Dh),
//                 slot_mapping (N,) int64, H, Hkv): rotates q and k inside qkv (Llama's rotate-half,
//                 in place), then copies k and v of token t to cache slot slot_mapping[t]
//   silu_and_mul(gate_up (N, 2I))              -> silu(gate) * up, (N, I)
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <cmath>
#include <tuple>
#include <vector>

namespace {

// Rows per parallel task: small batches (decode) stay on one thread, where a fork/join of the
// thread pool would cost more than the work.
inline int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elems)); }

void check_rows(const at::Tensor& t, int64_t D, const char* name) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == D, name, " must end in a dimension of ", D);
}

// out = rms_norm(x (+ delta)) * w; when sum_out is given it receives x + delta in scalar_t.
template <typename scalar_t>
void norm_rows(const scalar_t* x, const scalar_t* delta, const scalar_t* w, double eps, scalar_t* out,
               scalar_t* sum_out, int64_t rows, int64_t D) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, grain_rows(D), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> v(D), t(D), wf(D);
    adadepth_cpu::widen(w, wf.data(), D);
    for (int64_t r = begin; r < end; ++r) {
      adadepth_cpu::widen(x + r * D, v.data(), D);
      if (delta != nullptr) {
        // The sum is rounded to scalar_t (it is the residual stream the next layer reads), and the
        // norm is taken of that rounded value.
        adadepth_cpu::widen(delta + r * D, t.data(), D);
        for (int64_t d = 0; d < D; ++d) v[d] += t[d];
        adadepth_cpu::narrow(v.data(), sum_out + r * D, D);
        adadepth_cpu::widen(sum_out + r * D, v.data(), D);
      }
      acc_t ss = 0;
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) ss += v[d] * v[d];
      const acc_t inv = acc_t(1) / std::sqrt(ss / static_cast<acc_t>(D) + static_cast<acc_t>(eps));
      for (int64_t d = 0; d < D; ++d) t[d] = v[d] * inv * wf[d];
      adadepth_cpu::narrow(t.data(), out + r * D, D);
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  const int64_t D = weight.numel();
  check_rows(x, D, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type(), "weight must be contiguous, of x's dtype");
  at::Tensor out = at::empty(x.sizes(), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
    norm_rows<scalar_t>(x.data_ptr<scalar_t>(), nullptr, weight.data_ptr<scalar_t>(), eps, out.data_ptr<scalar_t>(),
                        nullptr, x.numel() / D, D);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& h, const at::Tensor& delta, const at::Tensor& weight,
                                                double eps) {
  const int64_t D = weight.numel();
  check_rows(h, D, "h");
  check_rows(delta, D, "delta");
  TORCH_CHECK(h.sizes() == delta.sizes(), "h and delta must have the same shape");
  TORCH_CHECK(delta.scalar_type() == h.scalar_type() && weight.scalar_type() == h.scalar_type() && weight.is_contiguous(),
              "h, delta and weight must share a dtype");
  at::Tensor sum = at::empty(h.sizes(), h.options());
  at::Tensor out = at::empty(h.sizes(), h.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, h.scalar_type(), "add_rms_norm", [&] {
    norm_rows<scalar_t>(h.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), eps,
                        out.data_ptr<scalar_t>(), sum.data_ptr<scalar_t>(), h.numel() / D, D);
  });
  return {sum, out};
}

void rope_write_kv(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                   const at::Tensor& v_cache, const at::Tensor& slot_mapping, int64_t num_heads, int64_t num_kv_heads) {
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0, "head counts must be positive");
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.sizes() == v_cache.sizes() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "k/v_cache must be contiguous (slots, Hkv, Dh)");
  const int64_t num_slots = k_cache.size(0), Dh = k_cache.size(2), half = Dh / 2;
  TORCH_CHECK(k_cache.size(1) == num_kv_heads && Dh % 2 == 0, "cache must be (slots, num_kv_heads, even head_dim)");
  const int64_t W = (num_heads + 2 * num_kv_heads) * Dh;
  check_rows(qkv, W, "qkv");
  const int64_t N = qkv.numel() / W;
  TORCH_CHECK(k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "qkv and the cache must share a dtype");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                  cos.numel() == N * half && sin.numel() == N * half,
              "cos/sin must be contiguous float32 (N, head_dim / 2)");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() >= N,
              "slot_mapping must be contiguous int64 with a slot per token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < N; ++t) TORCH_CHECK(slots[t] >= 0 && slots[t] < num_slots, "slot_mapping entry out of range");
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t rotated = num_heads + num_kv_heads, kv = num_kv_heads * Dh;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rope_write_kv", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* base = qkv.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    at::parallel_for(0, N, grain_rows(W), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* row = base + t * W;
        const float* c = cp + t * half;
        const float* s = sp + t * half;
        for (int64_t h = 0; h < rotated; ++h) {
          scalar_t* x = row + h * Dh;
          for (int64_t i = 0; i < half; ++i) {
            const acc_t a = static_cast<acc_t>(x[i]), b = static_cast<acc_t>(x[i + half]);
            x[i] = static_cast<scalar_t>(a * c[i] - b * s[i]);
            x[i + half] = static_cast<scalar_t>(b * c[i] + a * s[i]);
          }
        }
        // Padding tokens of a prefill share scratch slot 0: their racing writes are never read.
        std::copy(row + num_heads * Dh, row + num_heads * Dh + kv, kc + slots[t] * kv);
        std::copy(row + num_heads * Dh + kv, row + W, vc + slots[t] * kv);
      }
    });
  });
}

template <typename scalar_t>
void silu_and_mul_rows(const scalar_t* in, scalar_t* out, int64_t rows, int64_t I) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, rows, grain_rows(2 * I), [&](int64_t begin, int64_t end) {
    // Widen into plain buffers first, so that the exp loop vectorises (see cpu_math.h).
    std::vector<acc_t> g(I), u(I);
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* gr = in + r * 2 * I;
      const scalar_t* ur = gr + I;
      adadepth_cpu::widen(gr, g.data(), I);
      adadepth_cpu::widen(ur, u.data(), I);
      acc_t* gp = g.data();
      const acc_t* up = u.data();
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) gp[i] = gp[i] / (acc_t(1) + adadepth_cpu::vexp(-gp[i])) * up[i];
      adadepth_cpu::narrow(gp, out + r * I, I);
    }
  });
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.dim() >= 1 && gate_up.size(-1) % 2 == 0,
              "gate_up must be contiguous (..., 2 I)");
  const int64_t I = gate_up.size(-1) / 2, N = gate_up.numel() / (2 * I);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = I;
  at::Tensor out = at::empty(shape, gate_up.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gate_up.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(gate_up.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), N, I);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adadepth, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor h, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope_write_kv(Tensor(a!) qkv, Tensor cos, Tensor sin, Tensor(b!) k_cache, Tensor(c!) v_cache, "
        "Tensor slot_mapping, int num_heads, int num_kv_heads) -> ()");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rope_write_kv", &rope_write_kv);
  m.impl("silu_and_mul", &silu_and_mul);
}
