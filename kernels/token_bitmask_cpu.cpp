// Grammar masks on CPU: -inf to the logits of the tokens a row's packed bitmask does not allow.
//
// bitmask (B, W) int32, W = ceil(V / 32): bit b of word w allows token 32 w + b (xgrammar's layout).
// Only the listed rows are touched. A word of all ones (every token allowed) is skipped; in a
// constrained state most words are zero, so the work is one pass of writes over each row.
#include <torch/library.h>
#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

namespace {

void apply_token_bitmask(at::Tensor logits, const at::Tensor& bitmask, const at::Tensor& rows) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat,
              "logits must be contiguous (B, V) float32");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.is_contiguous() && bitmask.scalar_type() == at::kInt,
              "bitmask must be contiguous (B, W) int32");
  TORCH_CHECK(rows.dim() == 1 && rows.scalar_type() == at::kLong, "rows must be (R,) int64");
  const int64_t B = logits.size(0), V = logits.size(1), W = bitmask.size(1), R = rows.size(0);
  TORCH_CHECK(bitmask.size(0) >= B && W * 32 >= V, "bitmask must cover every row and token");
  float* L = logits.data_ptr<float>();
  const uint32_t* M = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  const int64_t* rp = rows.contiguous().data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(rp[r] >= 0 && rp[r] < B, "row index out of range");
  const float neg_inf = -std::numeric_limits<float>::infinity();
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < R; ++r) {
    float* l = L + rp[r] * V;
    const uint32_t* m = M + rp[r] * W;
    for (int64_t w = 0; w < W; ++w) {
      const uint32_t word = m[w];
      if (word == 0xFFFFFFFFu) continue;
      const int64_t base = w * 32, n = std::min<int64_t>(32, V - base);
      for (int64_t b = 0; b < n; ++b)
        if (!((word >> b) & 1u)) l[base + b] = neg_inf;
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adadepth, m) {
  m.def("apply_token_bitmask(Tensor(a!) logits, Tensor bitmask, Tensor rows) -> ()");
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) { m.impl("apply_token_bitmask", &apply_token_bitmask); }
