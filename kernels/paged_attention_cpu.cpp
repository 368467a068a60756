// Decode attention straight from the paged KV cache, on CPU (float32 or bfloat16; math in float32).
//
// Why: the PyTorch path first gathers every row's context blocks into a fresh (n, S, Hkv, Dh)
// tensor per layer (index_select: a copy of the whole context, plus a large allocation), then runs
// SDPA over it. Here each (row, kv head) reads its blocks in place, once for K and once for V.
//
// Semantics (same as paged_decode_attention_ref in paged_attention.py):
//   q            (n, H, Dh)                 one new token per row, RoPE applied
//   k/v_cache    (num_blocks, bs, Hkv, Dh)  the layer's cache, this step's k/v already written
//   block_table  (n, nblk) int64            row i's context position s lives in block
//                                           block_table[i, s / bs], slot s % bs
//   context_lens (n,) int64                 row i attends to positions [0, context_lens[i])
//   out[i, h] = softmax(scale * q[i, h] . K[i, :, h / G]) @ V[i, :, h / G],  G = H / Hkv (GQA)
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "cpu_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

// Ask for a whole block ahead of use: blocks of a row are scattered over the cache, so the
// hardware prefetcher, which follows sequential runs, stalls at every block boundary. Into L2
// (locality 2), not L1: a block is more lines than L1 can have in flight, and L1-bound
// prefetches then wait on each other (as in the bf16 path below).
template <typename scalar_t>
inline void prefetch_block(const scalar_t* p, int64_t elems) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < elems * static_cast<int64_t>(sizeof(scalar_t)); off += 64) __builtin_prefetch(c + off, 0, 2);
}

// scores[s] = exp(scores[s] - m) for s < len (m: their maximum); returns their sum, the softmax's
// denominator.
inline float softmax_numerators(float* scores, int64_t len, float m) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t s = 0; s < len; ++s) {
    scores[s] = adadepth_cpu::vexp(scores[s] - m);
    sum += scores[s];
  }
  return sum;
}

// Calls visit(s, row) for each context position s in [0, len) of one row, `row` pointing at that
// position's (Hkv, Dh) slot in `cache`, block by block with the next block prefetched.
template <typename scalar_t, typename Visit>
inline void for_each_context_slot(const scalar_t* cache, const int64_t* row_blocks, int64_t len, int64_t bs,
                                  int64_t tok_stride, Visit&& visit) {
  const int64_t blk_stride = bs * tok_stride, num_ctx_blocks = (len + bs - 1) / bs;
  for (int64_t b = 0; b < num_ctx_blocks; ++b) {
    const scalar_t* blk = cache + row_blocks[b] * blk_stride;
    if (b + 1 < num_ctx_blocks) prefetch_block(cache + row_blocks[b + 1] * blk_stride, blk_stride);
    const int64_t tokens = std::min(bs, len - b * bs);
    for (int64_t t = 0; t < tokens; ++t) visit(b * bs + t, blk + t * tok_stride);
  }
}

template <typename scalar_t, int DH>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* bt,
            const int64_t* lens, int64_t nblk, double scale, at::Tensor& out);

// The head dim as a compile-time constant where it is a common one (64, 128): the dot products
// and updates then unroll into a few full-width vector ops with no loop tail. DH = 0: any head dim.
template <typename scalar_t>
void attend_any(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* bt,
                const int64_t* lens, int64_t nblk, double scale, at::Tensor& out) {
  switch (q.size(2)) {
    case 64: attend<scalar_t, 64>(q, k_cache, v_cache, bt, lens, nblk, scale, out); break;
    case 128: attend<scalar_t, 128>(q, k_cache, v_cache, bt, lens, nblk, scale, out); break;
    default: attend<scalar_t, 0>(q, k_cache, v_cache, bt, lens, nblk, scale, out); break;
  }
}

#if defined(__AVX512BF16__)
// bf16 on CPUs with AVX512-BF16: the same math with bf16 dot products.
//
// Why: the portable loop below widens every key to float32 and sums each q . k across one vector
// (a horizontal reduction per position and head). It measured compute-bound, not memory-bound:
// as slow on a context that fits in cache as on one scattered over a large cache, and faster with
// a second thread. Here 32 key values feed one `vdpbf16ps` (exact products,
// float32 sums) and the partial sums of 16 positions are reduced together by one transpose-and-add
// tree; values are widened once per position and shared by the G query heads of their kv head.

// Ask for the (heads, Dh) slots of context positions [s0, s1) ahead of use: positions are scattered
// over the cache block by block, which the hardware prefetcher does not follow. Into L2
// (_MM_HINT_T1), not L1: 16 positions are ~100 lines, more than L1 keeps in flight; prefetched
// into L1 they queue behind each other and the kernel read a cold cache at 9-11 GB/s, into L2 at
// 14-16 GB/s (2-core Zen 4, 16-64 rows of 170-400 positions; benchmarks/results/decode_attention.json).
inline void prefetch_slots(const c10::BFloat16* cache, const int64_t* offs, int64_t s0, int64_t s1, int64_t bytes) {
  for (int64_t s = s0; s < s1; ++s)
    for (int64_t off = 0; off < bytes; off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(cache + offs[s]) + off, _MM_HINT_T1);
}

// One task: kv heads [0, nkv) of one row (q, k, v, out already offset to the task's first head),
// each with its G query heads; context position s's (Hkv, Dh) slot starts at k/v + offs[s].
// q, out: (nkv * G, DH); scores: (nkv * G, len) scratch; acc: (nkv * G, DH) scratch.
// Both passes walk the context 16 positions at a time, every head of the task inside that chunk:
// a chunk's slots come from memory once (they are cold: the step's weights went through the cache
// since this layer's last step) and are re-read from L1 for the other heads.
template <int DH, int G>
void attend_row_bf16(const c10::BFloat16* q, const c10::BFloat16* k, const c10::BFloat16* v, const int64_t* offs,
                     int64_t len, int64_t nkv, float scale, float* scores, float* acc, c10::BFloat16* out) {
  constexpr int KW = DH / 32;  // vdpbf16ps operands per key row
  constexpr int FW = DH / 16;  // float32 vectors per value row
  const int64_t nh = nkv * G, bytes = nkv * DH * 2;
  float vmax[64 * G];
  for (int64_t h = 0; h < nh; ++h) vmax[h] = -std::numeric_limits<float>::infinity();
  prefetch_slots(k, offs, 0, std::min<int64_t>(32, len), bytes);
  // Pass 1: scores = scale * q . k; per query head its KW query vectors and 16 partial sums stay
  // in registers.
  for (int64_t s0 = 0; s0 < len; s0 += 16) {
    const int count = static_cast<int>(std::min<int64_t>(16, len - s0));
    prefetch_slots(k, offs, std::min(s0 + 32, len), std::min(s0 + 48, len), bytes);
    const __mmask16 lanes = count == 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    for (int64_t h = 0; h < nh; ++h) {
      const c10::BFloat16* kh = k + (h / G) * DH;
      __m512bh qv[KW];
      for (int c = 0; c < KW; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + h * DH + c * 32);
      __m512 part[16];
      for (int j = 0; j < 16; ++j) {
        part[j] = _mm512_setzero_ps();
        if (j < count) {
          const c10::BFloat16* kr = kh + offs[s0 + j];
          for (int c = 0; c < KW; ++c)
            part[j] = _mm512_dpbf16_ps(part[j], qv[c], (__m512bh)_mm512_loadu_si512(kr + c * 32));
        }
      }
      const __m512 sc = _mm512_mul_ps(adadepth_cpu::sum16(part), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + h * len + s0, lanes, sc);
      vmax[h] = std::max(vmax[h], _mm512_mask_reduce_max_ps(lanes, sc));
    }
  }
  prefetch_slots(v, offs, 0, std::min<int64_t>(32, len), bytes);
  float denom[64 * G];
  for (int64_t h = 0; h < nh; ++h) denom[h] = softmax_numerators(scores + h * len, len, vmax[h]);
  // Pass 2: acc += p * v; per kv head its G x FW accumulators stay in registers through a chunk,
  // each value row widened once for the G query heads.
  for (int64_t e = 0; e < nh * DH; ++e) acc[e] = 0.f;
  for (int64_t s0 = 0; s0 < len; s0 += 16) {
    const int64_t s1 = std::min(s0 + 16, len);
    prefetch_slots(v, offs, std::min(s0 + 32, len), std::min(s0 + 48, len), bytes);
    for (int64_t kh = 0; kh < nkv; ++kh) {
      __m512 a[G][FW];
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < FW; ++c) a[g][c] = _mm512_loadu_ps(acc + (kh * G + g) * DH + c * 16);
      for (int64_t s = s0; s < s1; ++s) {
        const c10::BFloat16* vr = v + offs[s] + kh * DH;
        __m512 vf[FW];
        for (int c = 0; c < FW; ++c) vf[c] = adadepth_cpu::widen16(vr + c * 16);
        for (int g = 0; g < G; ++g) {
          const __m512 p = _mm512_set1_ps(scores[(kh * G + g) * len + s]);
          for (int c = 0; c < FW; ++c) a[g][c] = _mm512_fmadd_ps(p, vf[c], a[g][c]);
        }
      }
      for (int g = 0; g < G; ++g)
        for (int c = 0; c < FW; ++c) _mm512_storeu_ps(acc + (kh * G + g) * DH + c * 16, a[g][c]);
    }
  }
  for (int64_t h = 0; h < nh; ++h) {
    const __m512 inv = _mm512_set1_ps(1.f / denom[h]);
    for (int c = 0; c < FW; ++c)  // round to nearest even, as PyTorch rounds float32 to bf16
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + h * DH + c * 16),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(acc + h * DH + c * 16), inv)));
  }
}

template <int DH, int G>
void attend_bf16(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* bt,
                 const int64_t* lens, int64_t nblk, double scale, at::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const c10::BFloat16* qp = q.data_ptr<c10::BFloat16>();
  const c10::BFloat16* kp = k_cache.data_ptr<c10::BFloat16>();
  const c10::BFloat16* vp = v_cache.data_ptr<c10::BFloat16>();
  c10::BFloat16* op = out.data_ptr<c10::BFloat16>();
  const int64_t tok_stride = Hkv * DH;
  // Tasks as in the portable loop: whole rows when there are enough, else (row, kv head).
  const int64_t splits = n >= 2 * at::get_num_threads() ? 1 : Hkv;
  const int64_t heads_per_task = Hkv / splits;
  at::parallel_for(0, n * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> offs;   // (len,): where each context position's slot starts
    std::vector<float> scores;   // (heads, len)
    std::vector<float> acc(heads_per_task * G * DH);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / splits, kh0 = (task % splits) * heads_per_task;
      const int64_t len = lens[i];
      const int64_t* row_blocks = bt + i * nblk;
      offs.resize(len);
      for (int64_t s = 0; s < len; ++s) offs[s] = (row_blocks[s / bs] * bs + s % bs) * tok_stride;
      scores.resize(heads_per_task * G * len);
      attend_row_bf16<DH, G>(qp + (i * H + kh0 * G) * DH, kp + kh0 * DH, vp + kh0 * DH, offs.data(), len,
                             heads_per_task, static_cast<float>(scale), scores.data(), acc.data(),
                             op + (i * H + kh0 * G) * DH);
    }
  });
}

template <int DH>
bool attend_bf16_for_group(int64_t G, const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const int64_t* bt, const int64_t* lens, int64_t nblk, double scale, at::Tensor& out) {
  switch (G) {
    case 1: attend_bf16<DH, 1>(q, k_cache, v_cache, bt, lens, nblk, scale, out); return true;
    case 2: attend_bf16<DH, 2>(q, k_cache, v_cache, bt, lens, nblk, scale, out); return true;
    case 3: attend_bf16<DH, 3>(q, k_cache, v_cache, bt, lens, nblk, scale, out); return true;
    case 4: attend_bf16<DH, 4>(q, k_cache, v_cache, bt, lens, nblk, scale, out); return true;
    case 6: attend_bf16<DH, 6>(q, k_cache, v_cache, bt, lens, nblk, scale, out); return true;
    case 8: attend_bf16<DH, 8>(q, k_cache, v_cache, bt, lens, nblk, scale, out); return true;
    default: return false;
  }
}

// The AVX512-BF16 path where it has an instantiation (head dim 32/64/128, 1-4, 6 or 8 query heads
// per kv head, at most 64 kv heads); false: the caller runs the portable loop.
bool attend_bf16_avx512(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* bt,
                        const int64_t* lens, int64_t nblk, double scale, at::Tensor& out) {
  const int64_t G = q.size(1) / k_cache.size(2);
  if (k_cache.size(2) > 64) return false;  // attend_row_bf16 keeps per-head maxima on the stack
  switch (q.size(2)) {
    case 32: return attend_bf16_for_group<32>(G, q, k_cache, v_cache, bt, lens, nblk, scale, out);
    case 64: return attend_bf16_for_group<64>(G, q, k_cache, v_cache, bt, lens, nblk, scale, out);
    case 128: return attend_bf16_for_group<128>(G, q, k_cache, v_cache, bt, lens, nblk, scale, out);
    default: return false;
  }
}
#endif

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_table, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q_in.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "expected q (n, H, Dh) and k/v_cache (num_blocks, bs, Hkv, Dh)");
  TORCH_CHECK((q_in.scalar_type() == at::kFloat || q_in.scalar_type() == at::kBFloat16) &&
                  k_cache.scalar_type() == q_in.scalar_type() && v_cache.scalar_type() == q_in.scalar_type(),
              "paged_decode_attention takes float32 or bfloat16, q and cache alike");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "k/v_cache must be contiguous");
  TORCH_CHECK(block_table.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong,
              "block_table and context_lens must be int64");
  const at::Tensor q = q_in.contiguous();
  const at::Tensor table = block_table.contiguous();
  const at::Tensor lens_t = context_lens.contiguous();
  const int64_t n = q.size(0), H = q.size(1), Dh = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), Hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == Dh, "head_dim of q and cache differ");
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "num_heads must be a multiple of num_kv_heads");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == n && lens_t.numel() == n,
              "block_table must be (n, nblk) and context_lens (n,)");
  const int64_t nblk = table.size(1);
  const int64_t* bt = table.data_ptr<int64_t>();
  const int64_t* lens = lens_t.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lens[i] >= 1 && lens[i] <= nblk * bs, "context_lens[", i, "] = ", lens[i],
                " outside [1, ", nblk * bs, "]");
    for (int64_t b = 0; b < (lens[i] + bs - 1) / bs; ++b) {
      TORCH_CHECK(bt[i * nblk + b] >= 0 && bt[i * nblk + b] < num_blocks, "block_table entry out of range");
    }
  }
  at::Tensor out = at::empty({n, H, Dh}, q.options());
  if (q.scalar_type() == at::kFloat) {
    attend_any<float>(q, k_cache, v_cache, bt, lens, nblk, scale, out);
  } else {
#if defined(__AVX512BF16__)
    if (attend_bf16_avx512(q, k_cache, v_cache, bt, lens, nblk, scale, out)) return out;
#endif
    attend_any<c10::BFloat16>(q, k_cache, v_cache, bt, lens, nblk, scale, out);
  }
  return out;
}

// One K or V row (Dh values) in float32: the row itself when it is float32 (a copy there was a
// memcpy call per position and kv head: cold contexts of 64 rows x 400 positions took 1.09-1.33x
// longer with it, benchmarks/results/decode_attention_fp32_inplace.json), else widened into `fixed`
// when the head dim is a compile-time constant (the loop then unrolls), or into `widened`.
template <typename scalar_t, int DH>
inline const float* widen_row(const scalar_t* row, int64_t Dh, float* fixed, std::vector<float>& widened) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else if constexpr (DH > 0) {
    for (int64_t d = 0; d < DH; ++d) fixed[d] = static_cast<float>(row[d]);
    return fixed;
  } else {
    for (int64_t d = 0; d < Dh; ++d) widened[d] = static_cast<float>(row[d]);
    return widened.data();
  }
}

template <typename scalar_t, int DH>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const int64_t* bt,
            const int64_t* lens, int64_t nblk, double scale, at::Tensor& out) {
  const int64_t n = q.size(0), H = q.size(1), Dh = DH > 0 ? DH : q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = H / Hkv;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k_cache.data_ptr<scalar_t>();
  const scalar_t* vp = v_cache.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t tok_stride = Hkv * Dh;
  const float fscale = static_cast<float>(scale);
  // A task is one row and a range of its kv heads. Whole rows when there are enough of them: a
  // block then streams through as one contiguous bs*Hkv*Dh run (a decode step is bound by how
  // fast the context comes from DRAM, not by arithmetic). Small batches split rows by kv head
  // so that every thread has work.
  const int64_t splits = n >= 2 * at::get_num_threads() ? 1 : Hkv;
  const int64_t heads_per_task = Hkv / splits;

  at::parallel_for(0, n * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;       // (heads, len): scores, then softmax numerators
    std::vector<float> acc;          // (heads, Dh): unnormalised output
    std::vector<float> denom;
    std::vector<float> qf;           // (heads, Dh): this task's queries in float32
    std::vector<float> widened(DH > 0 ? 0 : Dh);  // one K or V row in float32 (any head dim)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t i = task / splits, kh0 = (task % splits) * heads_per_task;
      const int64_t h0 = kh0 * G, nh = heads_per_task * G;   // query heads [h0, h0 + nh)
      const int64_t len = lens[i];
      const int64_t* row_blocks = bt + i * nblk;
      qf.resize(nh * Dh);
      for (int64_t e = 0; e < nh * Dh; ++e) qf[e] = static_cast<float>(qp[(i * H + h0) * Dh + e]);
      const float* qi = qf.data();                           // (nh, Dh)
      scores.resize(nh * len);
      acc.assign(nh * Dh, 0.f);
      denom.resize(nh);
      // Pass 1: scores = scale * q . k.
      for_each_context_slot(kp, row_blocks, len, bs, tok_stride, [&](int64_t s, const scalar_t* krow) {
        krow += kh0 * Dh;
        for (int64_t kh = 0; kh < heads_per_task; ++kh) {
          float k_fixed[DH > 0 ? DH : 1];  // this slot's key, widened once for its G query heads
          const float* kf = widen_row<scalar_t, DH>(krow + kh * Dh, Dh, k_fixed, widened);
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kh * G + g;
            const float* qh = qi + h * Dh;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < Dh; ++d) dot += qh[d] * kf[d];
            scores[h * len + s] = dot * fscale;
          }
        }
      });
      for (int64_t h = 0; h < nh; ++h) {
        float* sh = scores.data() + h * len;
        denom[h] = softmax_numerators(sh, len, *std::max_element(sh, sh + len));
      }
      // Pass 2: acc += p * v.
      for_each_context_slot(vp, row_blocks, len, bs, tok_stride, [&](int64_t s, const scalar_t* vrow) {
        vrow += kh0 * Dh;
        for (int64_t kh = 0; kh < heads_per_task; ++kh) {
          float v_fixed[DH > 0 ? DH : 1];  // this slot's value, widened once for its G query heads
          const float* vf = widen_row<scalar_t, DH>(vrow + kh * Dh, Dh, v_fixed, widened);
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = kh * G + g;
            const float w = scores[h * len + s];
            float* a = acc.data() + h * Dh;
#pragma omp simd
            for (int64_t d = 0; d < Dh; ++d) a[d] += w * vf[d];
          }
        }
      });
      for (int64_t h = 0; h < nh; ++h) {
        scalar_t* o = op + (i * H + h0 + h) * Dh;
        const float inv = 1.f / denom[h];
        for (int64_t d = 0; d < Dh; ++d) o[d] = static_cast<scalar_t>(acc[h * Dh + d] * inv);
      }
    }
  });
}

// Whether bf16 attention of this head dim and query heads per kv head takes the AVX512-BF16 path.
bool paged_attention_bf16_fast(int64_t head_dim, int64_t group) {
#if defined(__AVX512BF16__)
  const bool dims = head_dim == 32 || head_dim == 64 || head_dim == 128;
  return dims && (group == 1 || group == 2 || group == 3 || group == 4 || group == 6 || group == 8);
#else
  (void)head_dim;
  (void)group;
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(adadepth, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, "
        "Tensor context_lens, float scale) -> Tensor");
  m.def("paged_attention_bf16_fast(int head_dim, int group) -> bool", &paged_attention_bf16_fast);
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
