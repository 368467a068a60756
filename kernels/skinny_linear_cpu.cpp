// y = x @ W^T (+ b) for a few rows of x, bf16, on CPUs with AVX512-BF16.
//
// Why: a decode step at batch 1-4 is bound by reading the weights once, and oneDNN's bf16 inner
// product reads cold weights (a layer's matrices, gone from cache since the last step) well below
// the memory's pace: it is built for wider products (decode steps 1.16-1.55x faster with this
// kernel on a 2-core Zen 4, benchmarks/results/skinny_linear.json). Here
// each thread walks its share of W's rows front to back (plain row-major, the model's own
// Parameter: no second copy), every 32 bf16 weights feed one `vdpbf16ps` per row of x (exact
// products, float32 sums), and the 16 partial-sum vectors of 16 output columns are reduced
// together by one transpose-and-add tree.
//
// Semantics (same as F.linear on bf16 tensors, which is the reference): x (M, K) bf16, w (N, K)
// bf16, b (N,) bf16 or none; y (M, N) bf16 = round(sum_k x[m, k] w[n, k] + b[n]), summed in float32.
// M in 1..4, K a multiple of 32, N a multiple of 16 (the caller checks and keeps oneDNN otherwise).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_linear.h"
#include "cpu_math.h"

namespace {

#if defined(__AVX512BF16__)
template <int M>
void skinny(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* b, c10::BFloat16* y, int64_t N,
            int64_t K) {
  // A task is 16 output columns: 16 rows of W, ~18 KB for K = 576.
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * 16;
      __m512 partial[M][16];  // [m][j]: x row m's products with W row n0 + j, before their sum
      for (int j = 0; j < 16; ++j) {
        const c10::BFloat16* wr = w + (n0 + j) * K;
        __m512 acc[M];
        for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k += 32) {
          const __m512bh wv = (__m512bh)_mm512_loadu_si512(wr + k);
          for (int m = 0; m < M; ++m)
            acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_loadu_si512(x + m * K + k), wv);
        }
        for (int m = 0; m < M; ++m) partial[m][j] = acc[m];
      }
      // bf16 -> f32 is a 16-bit shift.
      const __m512 bias = b == nullptr ? _mm512_setzero_ps()
          : adadepth_cpu::widen16(b + n0);
      for (int m = 0; m < M; ++m) {
        const __m512 sums = _mm512_add_ps(adadepth_cpu::sum16(partial[m]), bias);
        // Round to nearest even, as PyTorch rounds float32 to bf16.
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + n0), (__m256i)_mm512_cvtneps_pbh(sums));
      }
    }
  });
}
#endif

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "expected x (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "skinny_linear takes bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 4 && K % 32 == 0 && N % 16 == 0,
              "skinny_linear takes 1..4 rows, K a multiple of 32 and N of 16");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const at::Tensor xc = x.contiguous();
  at::Tensor bc;
  const c10::BFloat16* bp = adadepth_cpu::bias_ptr<c10::BFloat16>(bias, N, bc);
  at::Tensor y = at::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  switch (M) {
    case 1: skinny<1>(xp, wp, bp, yp, N, K); break;
    case 2: skinny<2>(xp, wp, bp, yp, N, K); break;
    case 3: skinny<3>(xp, wp, bp, yp, N, K); break;
    default: skinny<4>(xp, wp, bp, yp, N, K); break;
  }
#else
  TORCH_CHECK(false, "skinny_linear needs a CPU with AVX512-BF16 (this build has none)");
#endif
  return y;
}

bool skinny_linear_supported() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adadepth, m) {
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  // Whether this machine's build has the kernel (compiled with -march=native).
  m.def("skinny_linear_supported() -> bool", &skinny_linear_supported);
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
