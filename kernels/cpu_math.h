// exp that the compiler can vectorise: glibc declares its vector expf (libmvec) only under
// -ffast-math, so a plain std::exp in an `omp simd` loop stays a scalar call.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

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

}  // namespace adadepth_cpu
