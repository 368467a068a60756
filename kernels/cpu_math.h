// Math shared by the CPU kernels: an exp that the compiler can vectorise (glibc declares its
// vector expf, libmvec, only under -ffast-math, so a plain std::exp in an `omp simd` loop stays a
// scalar call), and AVX-512 helpers for the bf16 kernels.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <c10/util/BFloat16.h>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace adadepth_cpu {

// Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for exactness), a degree-6
// polynomial for e^r, then 2^n put straight into the exponent bits. Relative error ~2e-7 (one or
// two float ulps); inputs clamped to the finite range.
inline float vexp(float x) {
  x = std::min(std::max(x, -87.3f), 88.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
}

inline double vexp(double x) { return std::exp(x); }  // float64 runs in tests only

#if defined(__AVX512BF16__)
// Lane t of the result = the sum of v[t]'s 16 lanes. Four levels of shuffles and adds, each
// halving the vectors; the tree leaves the sums in lane order 0,2,1,3, 8,10,9,11, 4,6,5,7,
// 12,14,13,15 (worked out level by level), which one permute puts back in order.
inline __m512 sum16(const __m512* v) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)  // 256-bit halves
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], 0x44), _mm512_shuffle_f32x4(v[i], v[i + 8], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit quarters
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[i], w[i + 4], 0x88), _mm512_shuffle_f32x4(w[i], w[i + 4], 0xDD));
  for (int i = 0; i < 2; ++i)  // pairs inside each quarter
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[i], x[i + 2], 0x44), _mm512_shuffle_ps(x[i], x[i + 2], 0xEE));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  const __m512i order = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
  return _mm512_permutexvar_ps(order, z);
}

// 16 bf16 -> 16 float32: bf16 is the top half of a float32, so a 16-bit shift.
inline __m512 widen16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif


// dst[i] = float(src[i]) for i < n. GCC does not vectorise c10's scalar bf16 conversions, so bf16
// takes 16 at a time where the build has AVX512-BF16.
template <typename scalar_t, typename acc_t>
inline void widen(const scalar_t* src, acc_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, widen16(src + i));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

// dst[i] = scalar_t(src[i]) for i < n, rounded to nearest even as PyTorch rounds float32 to bf16.
template <typename scalar_t, typename acc_t>
inline void narrow(const acc_t* src, scalar_t* dst, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    for (; i + 16 <= n; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  }
#endif
  for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

}  // namespace adadepth_cpu
