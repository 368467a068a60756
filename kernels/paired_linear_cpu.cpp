// y = x @ W^T (+ b) for a decode step's rows (1 to about 256) from a copy of W packed for this
// kernel: bf16 on CPUs with AVX512-BF16 (W in k-pairs, from 5 rows: fewer go to skinny_linear_cpu.cpp),
// float32 on CPUs with AVX2 and FMA (W in 8-column blocks, every row count up to the limit).
//
// Why: between two decode steps a layer's weights leave the cache, and at these batch sizes
// oneDNN's inner product spends much of its time waiting for them to come back (it ran the same
// products faster on weights still in cache). This kernel streams each group of column blocks of
// the packed weight front to back once and keeps a tile of rows x blocks of accumulators in
// registers while it does (bf16: 8 rows x 3 blocks of 16, asking for the weights a few KB ahead;
// float32: 6 rows x 2 blocks of 8, 12 of the 16 ymm registers, also asking for the weights ahead)
// (benchmarks/results/matmul_rows.json, skinny_linear.json, matmul_rows_fp32.json).
//
// bf16 layout: w_paired (N/16, K/2, 16, 2), w_paired[nb, kp, j, t] = W[16 nb + j, 2 kp + t]
// (`pack_pairs` in paired_linear.py): one 64-byte vector holds 16 output columns x 2 inputs,
// which is what `vdpbf16ps` multiplies against one broadcast pair of x values (exact products,
// float32 sums).
// float32 layout: w_paired (N/8, K, 8), w_paired[nb, k, j] = W[8 nb + j, k] (`pack_blocks`): one
// 32-byte vector holds 8 output columns of one input, multiplied by x[m, k] broadcast (one FMA).
// On CPUs with F16C the same layout may hold float16 values (a weight rounded to float16 at load,
// ModelConfig.weight_dtype): 16 bytes per 8 columns, widened exactly to float32 by one `vcvtph2ps`;
// products and sums stay float32. A decode step then reads half the bytes.
//
// Semantics (reference: paired_linear_ref, i.e. F.linear on the unpacked weight): x (M, K), w_paired
// as above, b (N,) or none, all of one dtype (but float16 w_paired for float32 x); y (M, N) = sum_k x[m, k] W[n, k] + b[n], summed in
// float32 (bf16: rounded once at the end). Any M >= 1; bf16: K even, N a multiple of 16; float32:
// N a multiple of 8.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "cpu_linear.h"
#include "cpu_math.h"

#include <array>
#include <cstring>
#include <utility>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ADADEPTH_PAIRED_F32 1
#if defined(__F16C__)
#define ADADEPTH_PAIRED_F16W 1
#endif
#endif

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

#if defined(ADADEPTH_PAIRED_F32)
// A float32 tile: MB rows of x (row stride K) times NB 8-column blocks (each K vectors, the first at
// wb); sums to acc (MB, NB, 8). kF32TileRows x kF32TileBlocks = 12 accumulators: with the weight
// vectors and the broadcast, all in the 16 ymm registers (GCC kept 4 x 3 tiles' sums on the stack,
// spilling every step, unless every loop is unrolled as here).
constexpr int kF32TileRows = 6;
constexpr int kF32TileBlocks = 2;

// 8 weights as float32: a plain load, or (float16 copies, F16C) a 16-byte load widened exactly.
inline __m256 load8(const float* w) { return _mm256_loadu_ps(w); }
#if defined(ADADEPTH_PAIRED_F16W)
inline __m256 load8(const c10::Half* w) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))); }
#endif

// Weights asked for this many elements ahead of use in each stream (64 k-steps: 1 KB of float16,
// 2 KB of float32) by the first row tile of a column group, which meets them cold: at 1-8 rows the
// hardware prefetcher alone left the two cores short of the machine's read bandwidth. Prefetches
// past the end of the buffer are harmless (a prefetch never faults).
constexpr int64_t kF32PrefetchAhead = 512;
template <typename W, int NB, int MB>
inline void tile_f32(const float* x, int64_t K, const W* wb, bool prefetch, float* acc_out) {
  __m256 acc[NB][MB];
#pragma GCC unroll 8
  for (int n = 0; n < NB; ++n)
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_setzero_ps();
  const int64_t block = K * 8;  // a column block: K vectors of 8 floats
  const W* wk = wb;
  for (int64_t k = 0; k < K; ++k, wk += 8) {
    __m256 wv[NB];
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wk + n * block + kF32PrefetchAhead), _MM_HINT_T0);
      wv[n] = load8(wk + n * block);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MB; ++m) {
      const __m256 xb = _mm256_broadcast_ss(x + m * K + k);
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) acc[n][m] = _mm256_fmadd_ps(xb, wv[n], acc[n][m]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) _mm256_storeu_ps(acc_out + (m * NB + n) * 8, acc[n][m]);
}

template <typename W>
using TileF32 = void (*)(const float*, int64_t, const W*, bool, float*);

template <typename W, int NB, int... MB>
constexpr std::array<TileF32<W>, sizeof...(MB)> f32_tiles_of(std::integer_sequence<int, MB...>) {
  return {&tile_f32<W, NB, MB + 1>...};
}

// W: float (float32 copy) or c10::Half (float16 copy of a weight whose values float16 holds).
template <typename W>
at::Tensor paired_linear_f32(const at::Tensor& x, const at::Tensor& w_blocks, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(w_blocks.dim() == 3 && w_blocks.size(2) == 8, "float32 x takes w_paired (N/8, K, 8)");
  const int64_t M = x.size(0), K = x.size(1), N = w_blocks.size(0) * 8;
  TORCH_CHECK(M >= 1 && w_blocks.size(1) == K, "x has ", K, " inputs, w_paired ", w_blocks.size(1));
  TORCH_CHECK(w_blocks.is_contiguous(), "w_paired must be contiguous");
  const at::Tensor xc = x.contiguous();
  at::Tensor bc;
  const float* bp = adadepth_cpu::bias_ptr<float>(bias, N, bc);
  at::Tensor y = at::empty({M, N}, x.options());
  static constexpr std::array<std::array<TileF32<W>, kF32TileRows>, kF32TileBlocks> tiles = {
      f32_tiles_of<W, 1>(std::make_integer_sequence<int, kF32TileRows>{}),
      f32_tiles_of<W, 2>(std::make_integer_sequence<int, kF32TileRows>{})};
  const float* xp = xc.data_ptr<float>();
  const W* wp = w_blocks.data_ptr<W>();
  float* yp = y.data_ptr<float>();
  const int64_t num_blocks = N / 8, num_groups = (num_blocks + kF32TileBlocks - 1) / kF32TileBlocks;
  const int64_t num_row_tiles = (M + kF32TileRows - 1) / kF32TileRows;
  const int64_t tile_rows = (M + num_row_tiles - 1) / num_row_tiles;  // equal heights: 7 = 4 + 3
  // A task is a group of 2 column blocks (2 * K * 32 bytes of weights), for all M rows.
  at::parallel_for(0, num_groups, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float acc[kF32TileRows * kF32TileBlocks * 8];  // (rows, blocks, 8 columns)
    for (int64_t g = begin; g < end; ++g) {
      const int64_t nb0 = g * kF32TileBlocks, nb = std::min<int64_t>(kF32TileBlocks, num_blocks - nb0);
      const W* wb = wp + nb0 * K * 8;
      for (int64_t m0 = 0; m0 < M; m0 += tile_rows) {
        const int64_t rows = std::min<int64_t>(tile_rows, M - m0);
        tiles[nb - 1][rows - 1](xp + m0 * K, K, wb, m0 == 0, acc);
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = 0; n < nb; ++n) {
            const __m256 b = bp == nullptr ? _mm256_setzero_ps() : _mm256_loadu_ps(bp + (nb0 + n) * 8);
            _mm256_storeu_ps(yp + (m0 + m) * N + (nb0 + n) * 8, _mm256_add_ps(_mm256_load_ps(acc + (m * nb + n) * 8), b));
          }
      }
    }
  });
  return y;
}
#endif

bool supports(at::ScalarType dtype) {
#if defined(__AVX512BF16__)
  if (dtype == at::kBFloat16) return true;
#endif
#if defined(ADADEPTH_PAIRED_F32)
  if (dtype == at::kFloat) return true;
#endif
  return false;
}

// Whether float32 products also take a float16 copy of the weight (widened exactly in registers).
bool paired_linear_half_weights() {
#if defined(ADADEPTH_PAIRED_F16W)
  return true;
#else
  return false;
#endif
}

// Whether this machine's build (compiled with -march=native) has the kernel for `dtype`.
bool paired_linear_supports(at::ScalarType dtype) { return supports(dtype); }

at::Tensor paired_linear(const at::Tensor& x, const at::Tensor& w_paired, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2, "expected x (M, K)");
  TORCH_CHECK(supports(x.scalar_type()), "paired_linear has no ", x.scalar_type(),
              " kernel in this build (bf16 needs AVX512-BF16, float32 AVX2 and FMA)");
  TORCH_CHECK(x.scalar_type() == w_paired.scalar_type() || (x.scalar_type() == at::kFloat && w_paired.scalar_type() == at::kHalf &&
                                                            paired_linear_half_weights()),
              "x ", x.scalar_type(), " cannot take w_paired ", w_paired.scalar_type(),
              " (float32 x takes float32, or float16 where the CPU has F16C)");
#if defined(ADADEPTH_PAIRED_F32)
  if (x.scalar_type() == at::kFloat && w_paired.scalar_type() == at::kFloat) return paired_linear_f32<float>(x, w_paired, bias);
#endif
#if defined(ADADEPTH_PAIRED_F16W)
  if (x.scalar_type() == at::kFloat && w_paired.scalar_type() == at::kHalf) return paired_linear_f32<c10::Half>(x, w_paired, bias);
#endif
  TORCH_CHECK(w_paired.dim() == 4 && w_paired.size(2) == 16 && w_paired.size(3) == 2,
              "bf16 x takes w_paired (N/16, K/2, 16, 2)");
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
  m.def("paired_linear_supports(ScalarType dtype) -> bool", &paired_linear_supports);
  m.def("paired_linear_half_weights() -> bool", &paired_linear_half_weights);
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) { m.impl("paired_linear", &paired_linear); }
