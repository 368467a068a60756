// y = x @ W^T (+ b) for a few rows of x: bf16 on CPUs with AVX512-BF16, float32 on CPUs with AVX2+FMA.
//
// Why: a decode step at batch 1-4 is bound by reading the weights once, and oneDNN's inner product
// reads cold weights (a layer's matrices, gone from cache since the last step) well below the
// memory's pace: it is built for wider products (bf16 decode steps 1.16-1.55x faster with this
// kernel on a 2-core Zen 4, benchmarks/results/skinny_linear.json; float32 ones on an AVX2-only
// Zen 3, benchmarks/results/skinny_linear_fp32.json). Here each thread walks its share of W's rows
// front to back (plain row-major, the model's own Parameter: no second copy):
//   bf16:  every 32 weights feed one `vdpbf16ps` per row of x (exact products, float32 sums), and
//          the 16 partial-sum vectors of 16 output columns are reduced by one transpose-and-add tree;
//   fp32:  every 8 weights feed one FMA per row of x, R weight rows at a time so that R x M sums are
//          in flight (one chain per FMA unit would stall on its 4-cycle latency), and the 8
//          partial-sum vectors of 8 output columns are reduced by one hadd tree.
//
// Semantics (same as F.linear, which is the reference): x (M, K), w (N, K), b (N,) or none, all of
// one dtype; y (M, N) = sum_k x[m, k] w[n, k] + b[n], summed in float32 (bf16: rounded once to
// bf16 at the end). M in 1..4, K a multiple of 32, N a multiple of 16 (the caller checks and keeps
// oneDNN otherwise).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_linear.h"
#include "cpu_math.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ADADEPTH_SKINNY_F32 1
#endif

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

#if defined(ADADEPTH_SKINNY_F32)
// Lane t of the result = the sum of v[t]'s 8 lanes. hadd(a, b) = [a01 a23 b01 b23 | a45 a67 b45 b67],
// so two levels leave [v0..v3 low-half sums | v0..v3 high-half sums] and the same for v4..v7; the
// 128-bit halves are then crossed and added.
inline __m256 sum8(const __m256* v) {
  const __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

// R rows of W at a time: R x M accumulators, M x-vectors and one weight vector stay within the 16
// ymm registers (R = 4 up to M = 2, 2 beyond).
template <int M, int R = (M <= 2 ? 4 : 2)>
void skinny_f32(const float* x, const float* w, const float* b, float* y, int64_t N, int64_t K) {
  // A task is 8 output columns: 8 rows of W, 18 KB for K = 576.
  at::parallel_for(0, N / 8, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * 8;
      __m256 partial[M][8];  // [m][j]: x row m's products with W row n0 + j, before their sum
      for (int j0 = 0; j0 < 8; j0 += R) {
        const float* wr = w + (n0 + j0) * K;
        __m256 acc[R][M];
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k += 8) {
          __m256 xv[M];
          for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(x + m * K + k);
          for (int r = 0; r < R; ++r) {
            const __m256 wv = _mm256_loadu_ps(wr + r * K + k);
            for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(xv[m], wv, acc[r][m]);
          }
        }
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < M; ++m) partial[m][j0 + r] = acc[r][m];
      }
      const __m256 bias = b == nullptr ? _mm256_setzero_ps() : _mm256_loadu_ps(b + n0);
      for (int m = 0; m < M; ++m) _mm256_storeu_ps(y + m * N + n0, _mm256_add_ps(sum8(partial[m]), bias));
    }
  });
}
#endif

bool supports(at::ScalarType dtype) {
#if defined(__AVX512BF16__)
  if (dtype == at::kBFloat16) return true;
#endif
#if defined(ADADEPTH_SKINNY_F32)
  if (dtype == at::kFloat) return true;
#endif
  return false;
}

at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "expected x (M, K) and w (N, K)");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "x and w must have one dtype");
  TORCH_CHECK(supports(x.scalar_type()), "skinny_linear has no ", x.scalar_type(),
              " kernel in this build (bf16 needs AVX512-BF16, float32 AVX2 and FMA)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 4 && K % 32 == 0 && N % 16 == 0,
              "skinny_linear takes 1..4 rows, K a multiple of 32 and N of 16");
  TORCH_CHECK(w.is_contiguous(), "w must be contiguous");
  const at::Tensor xc = x.contiguous();
  at::Tensor bc;
  at::Tensor y = at::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  if (x.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* bp = adadepth_cpu::bias_ptr<c10::BFloat16>(bias, N, bc);
    const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
    const c10::BFloat16* wp = w.data_ptr<c10::BFloat16>();
    c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
    switch (M) {
      case 1: skinny<1>(xp, wp, bp, yp, N, K); break;
      case 2: skinny<2>(xp, wp, bp, yp, N, K); break;
      case 3: skinny<3>(xp, wp, bp, yp, N, K); break;
      default: skinny<4>(xp, wp, bp, yp, N, K); break;
    }
    return y;
  }
#endif
#if defined(ADADEPTH_SKINNY_F32)
  const float* bp = adadepth_cpu::bias_ptr<float>(bias, N, bc);
  const float* xp = xc.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (M) {
    case 1: skinny_f32<1>(xp, wp, bp, yp, N, K); break;
    case 2: skinny_f32<2>(xp, wp, bp, yp, N, K); break;
    case 3: skinny_f32<3>(xp, wp, bp, yp, N, K); break;
    default: skinny_f32<4>(xp, wp, bp, yp, N, K); break;
  }
#endif
  return y;
}

// Whether this machine's build (compiled with -march=native) has the kernel for `dtype`.
bool skinny_linear_supports(at::ScalarType dtype) { return supports(dtype); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(adadepth, m) {
  m.def("skinny_linear(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("skinny_linear_supports(ScalarType dtype) -> bool", &skinny_linear_supports);
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) { m.impl("skinny_linear", &skinny_linear); }
