// y = x @ W^T (+ b) for a decode step's rows (about 5 to 256), bf16, on CPUs with AVX512-BF16, from a
// copy of W packed in k-pairs.
//
// Why: between two decode steps a layer's weights leave the cache, and at these batch sizes
// oneDNN's bf16 inner product spends much of its time waiting for them to come back (it ran the
// same products faster on weights still in cache). This kernel streams each group of three
// 16-column blocks of the packed weight front to back once, asks for it a few KB ahead of use, and
// keeps 8 rows x 3 blocks of accumulators in registers while it does
// (benchmarks/results/matmul_rows.json, benchmarks/results/skinny_linear.json).
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

#include <array>
#include <cstring>
#include <utility>

namespace {

#if defined(__AVX512BF16__)
// Vectors of each weight stream asked for ahead of use: ~3 KB, about what a core keeps in flight.
constexpr int64_t kPrefetchAhead = 48;
// A tile: up to kTileRows rows of x against kTileBlocks 16-column blocks, kTileRows x kTileBlocks
// float32 accumulators in registers (24 of the 32 zmm; the rest hold the blocks' weight vectors and
// the broadcast x pair). Each weight vector loaded feeds kTileRows products, each broadcast x pair
// kTileBlocks (one column block at a time needed a broadcast per product and lost to oneDNN from 64
// rows on). The 8 x 3 tile ran the default model's products of 32-256 rows at 325-381 GFLOPS on a
// 2-core Zen 4, oneDNN's packed bf16 inner product at 283-367 (benchmarks/results/matmul_rows.json).
constexpr int kTileRows = 8;
constexpr int kTileBlocks = 3;

// Rows [0, MB) of x (row stride K) times NB consecutive 16-column blocks (each K/2 vectors, the
// first at wb); float32 sums to acc (MB, NB, 16). Prefetches the streams ahead (up to w_end) when
// `prefetch`: the first row tile of a column group meets its weights cold, the next ones find them
// in L1/L2.
template <int NB, int MB>
inline void tile(const c10::BFloat16* x, int64_t K, const c10::BFloat16* wb, const c10::BFloat16* w_end,
                 bool prefetch, float* acc_out) {
  __m512 acc[NB][MB];
  for (int n = 0; n < NB; ++n)
    for (int m = 0; m < MB; ++m) acc[n][m] = _mm512_setzero_ps();
  const int64_t KP = K / 2, block = K * 16;  // a column block: K/2 vectors of 32 bf16
  for (int64_t kp = 0; kp < KP; ++kp) {
    __m512bh wv[NB];
    for (int n = 0; n < NB; ++n) {
      const c10::BFloat16* ahead = wb + n * block + (kp + kPrefetchAhead) * 32;
      if (prefetch && ahead < w_end) _mm_prefetch(reinterpret_cast<const char*>(ahead), _MM_HINT_T0);
      wv[n] = (__m512bh)_mm512_loadu_si512(wb + n * block + kp * 32);
    }
    for (int m = 0; m < MB; ++m) {
      int32_t pair;  // x[m, 2kp], x[m, 2kp + 1], broadcast to all 16 lanes
      std::memcpy(&pair, x + m * K + 2 * kp, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      for (int n = 0; n < NB; ++n) acc[n][m] = _mm512_dpbf16_ps(acc[n][m], xb, wv[n]);
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int n = 0; n < NB; ++n) _mm512_storeu_ps(acc_out + (m * NB + n) * 16, acc[n][m]);
}

using TileFn = void (*)(const c10::BFloat16*, int64_t, const c10::BFloat16*, const c10::BFloat16*, bool, float*);

// tile<NB, rows> for rows 1..kTileRows.
template <int NB, int... MB>
constexpr std::array<TileFn, sizeof...(MB)> tiles_of(std::integer_sequence<int, MB...>) {
  return {&tile<NB, MB + 1>...};
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
  const c10::BFloat16* bp = adadepth_cpu::bias_ptr<c10::BFloat16>(bias, N, bc);
  at::Tensor y = at::empty({M, N}, x.options());
#if defined(__AVX512BF16__)
  // tiles[nb - 1][rows - 1]: nb column blocks (the last group of a row may have fewer than 3).
  static constexpr std::array<std::array<TileFn, kTileRows>, kTileBlocks> tiles = {
      tiles_of<1>(std::make_integer_sequence<int, kTileRows>{}),
      tiles_of<2>(std::make_integer_sequence<int, kTileRows>{}),
      tiles_of<3>(std::make_integer_sequence<int, kTileRows>{})};
  const c10::BFloat16* xp = xc.data_ptr<c10::BFloat16>();
  const c10::BFloat16* wp = w_paired.data_ptr<c10::BFloat16>();
  const c10::BFloat16* w_end = wp + w_paired.numel();
  c10::BFloat16* yp = y.data_ptr<c10::BFloat16>();
  const int64_t num_blocks = N / 16, num_groups = (num_blocks + kTileBlocks - 1) / kTileBlocks;
  // Row tiles of equal height (16 rows: 8 + 8, not 8 + 8 + 0; 17: 6 + 6 + 5).
  const int64_t num_row_tiles = (M + kTileRows - 1) / kTileRows;
  const int64_t tile_rows = (M + num_row_tiles - 1) / num_row_tiles;
  // A task is a group of 3 column blocks (3 * K * 32 bytes of weights), for all M rows.
  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    alignas(64) float acc[kTileRows * kTileBlocks * 16];  // (rows, blocks, 16 columns)
    for (int64_t g = begin; g < end; ++g) {
      const int64_t nb0 = g * kTileBlocks, nb = std::min<int64_t>(kTileBlocks, num_blocks - nb0);
      const c10::BFloat16* wb = wp + nb0 * K * 16;
      __m512 b[kTileBlocks];
      for (int64_t n = 0; n < nb; ++n)
        b[n] = bp == nullptr ? _mm512_setzero_ps() : adadepth_cpu::widen16(bp + (nb0 + n) * 16);
      for (int64_t m0 = 0; m0 < M; m0 += tile_rows) {
        const int64_t rows = std::min<int64_t>(tile_rows, M - m0);
        tiles[nb - 1][rows - 1](xp + m0 * K, K, wb, w_end, m0 == 0, acc);
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = 0; n < nb; ++n)  // round to nearest even, as PyTorch rounds float32 to bf16
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(yp + (m0 + m) * N + (nb0 + n) * 16),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(acc + (m * nb + n) * 16), b[n])));
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
