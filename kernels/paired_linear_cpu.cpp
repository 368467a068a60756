// y = x @ W^T (+ b) for a decode step's rows (about 5 to 48), bf16, on CPUs with AVX512-BF16, from a
// copy of W packed in k-pairs.
//
// Why: between two decode steps a layer's weights leave the cache, and at these batch sizes
// oneDNN's bf16 inner product spends much of its time waiting for them to come back (it ran the
// same products faster on weights still in cache). This kernel streams each 16-column
// block of the packed weight front to back once, asks for it a few KB ahead of use, and keeps up to
// 16 rows' accumulators in registers while it does (benchmarks/results/skinny_linear.json).
//
// Layout: w_paired (N/16, K/2, 16, 2) bf16, w_paired[nb, kp, j, t] = W[16 nb + j, 2 kp + t]
// (`pack_pairs` in paired_linear.py): one 64-byte vector holds 16 output columns x 2 inputs,
// which is what `vdpbf16ps` multiplies against one broadcast pair of x values (exact products,
// float32 sums).
//
// Semantics (reference: paired_linear_ref, i.e. F.linear on the unpacked weight): x (M, K) bf16,
// w_paired as above, b (N,) bf16 or none; y (M, N) bf16 = round(sum_k x[m, k] W[n, k] + b[n]),
// summed in float32. Any M >= 1, K even, N a multiple of 16.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_linear.h"
#include "cpu_math.h"

#include <cstring>

namespace {

#if defined(__AVX512BF16__)
// Vectors of the weight stream asked for ahead of use: ~3 KB, about what a core keeps in flight.
constexpr int64_t kPrefetchAhead = 48;

// Rows [0, MB) of x (row stride K) times one 16-column block (K/2 vectors, wb); float32 sums to
// acc (MB, 16). Prefetches the stream ahead (up to w_end) when `prefetch`: the first row block
// of a column block meets it cold, the next ones find it in L1.
template <int MB>
inline void column_block(const c10::BFloat16* x, int64_t K, const c10::BFloat16* wb, const c10::BFloat16* w_end,
                         bool prefetch, float* acc_out) {
  __m512 acc[MB];
  for (int m = 0; m < MB; ++m) acc[m] = _mm512_setzero_ps();
  const int64_t KP = K / 2;
  for (int64_t kp = 0; kp < KP; ++kp) {
    const c10::BFloat16* ahead = wb + (kp + kPrefetchAhead) * 32;
    if (prefetch && ahead < w_end) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
    const __m512bh wv = (__m512bh)_mm512_loadu_si512(wb + kp * 32);
    for (int m = 0; m < MB; ++m) {
      int32_t pair;  // x[m, 2kp], x[m, 2kp + 1], broadcast to all 16 lanes
      std::memcpy(&pair, x + m * K + 2 * kp, sizeof(pair));
      acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)_mm512_set1_epi32(pair), wv);
    }
  }
  for (int m = 0; m < MB; ++m) _mm512_storeu_ps(acc_out + m * 16, acc[m]);
}

using BlockFn = void (*)(const c10::BFloat16*, int64_t, const c10::BFloat16*, const c10::BFloat16*, bool, float*);

template <int... MB>
constexpr auto block_table(std::integer_sequence<int, MB...>) {
  return std::array<BlockFn, sizeof...(MB)>{&column_block<MB + 1>...};
}
#endif

at::Tensor paired_linear(const at::Tensor& x, const at::Tensor& w_paired, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w_paired.dim() == 4 && w_paired.size(2) == 16 && w_paired.size(3) == 2,
              "expected x (M, K) and w_paired (N/16, K/2, 16, 2)");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w_paired.scalar_type() == at::kBFloat16,
              "paired_linear takes bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w_paired.size(0) * 16;
  TORCH_CHECK(M >= 1 && w_paired.size(1) * 2 == K, "x has ", K, " inputs, w_paired ", w_paired.size(1) * 2);
  TORCH_CHECK(w_paired.is_contiguous(), "w_paired must be contiguous");
  const at::Tensor xc = x.contiguous();
  at::Tensor bc;
  const c10::BFloat16* bp = adadepth_cpu::bf16_bias(bias, N, bc);
  at::Tensor y = at::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  static constexpr auto blocks = block_table(std::make_integer_sequence<int, 16>{});
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = w_paired.data_ptr<c10::BFloat16>();
  const c10::BFloat16* w_end = wp + w_paired.numel();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  // A task is one 16-column block (K * 32 bytes of weights), for all M rows, 16 at a time.
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[16 * 16];  // (rows, 16 columns)
    for (int64_t nb = begin; nb < end; ++nb) {
      const c10::BFloat16* wb = wp + nb * K * 16;
      const __m512 b = bp == nullptr ? _mm512_setzero_ps() : adadepth_cpu::widen16(bp + nb * 16);
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const int64_t rows = std::min<int64_t>(16, M - m0);
        blocks[rows - 1](xp + m0 * K, K, wb, w_end, m0 == 0, acc);
        for (int64_t m = 0; m < rows; ++m)  // round to nearest even, as PyTorch rounds float32 to bf16
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + (m0 + m) * N + nb * 16),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(acc + m * 16), b)));
      }
    }
  });
#else
  TORCH_CHECK(false, "paired_linear needs a CPU with AVX512-BF16 (this build has none)");
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adadepth, m) {
  m.def("paired_linear(Tensor x, Tensor w_paired, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) { m.impl("paired_linear", &paired_linear); }
