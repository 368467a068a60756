// A whole decode step's layers in one call: the loop of AdaptiveLlama.run_layers, in C++.
//
// Why: at batch 1 a bf16 decode step of the default model reads 7 MB of weights per layer, about
// 0.2 ms at the memory's pace, and the Python around each layer's seven kernels (module calls,
// slicing, ~40 PyTorch calls through the Python dispatcher) made decode steps 1.14-1.27x longer than
// this loop does (batch 1-64, benchmarks/results/decode_loop_ab.json). Here the same kernels run in
// the same order, called through the C++ dispatcher.
//
// Semantics: exactly the per-layer path of `AdaptiveLlama.run_layers` for a decode-shaped bf16 or
// float32 step (one token per row, every row's attention through the paged kernel) without bypass ops,
// each matmul going where PackedLinear sends it: the skinny kernel (rows <= skinny_max_rows, plain
// weight; bf16 only: float32 callers pass skinny_max_rows = 0), the paired one (rows <=
// paired_max_rows, its packed copy: k-pairs or 8-column blocks) or oneDNN (its packed copy).
// Layer i runs rows [0, active_rows[i]) through
//     x = rms_norm(h, in_norm); qkv = x @ qkv^T (+b); rope_write_kv(qkv, ...);
//     attn = paged_decode_attention(q, ...); h', x = add_rms_norm(h, attn @ o^T (+b), post_norm);
//     h = h' + down(silu_and_mul(x @ gate_up^T (+b))) (+b)
// and leaves the other rows' residual stream as it was. Past paired_max_rows the gate/up product is
// PackedLinear.silu_and_mul's: two oneDNN products on the halves of gate_up, SiLU and the multiply
// in their epilogues. The Python path is the reference; the
// tests compare the two token for token and bit for bit.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using OptTensor = std::optional<at::Tensor>;

// The ops this loop calls, looked up once (they are registered by the other sources of this library).
struct LayerKernels {
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, double)> rms_norm;
  c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                              double)>
      add_rms_norm;
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, int64_t, int64_t)>
      rope_write_kv;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&)> silu_and_mul;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, double)>
      paged_attention;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)> skinny_linear;
  c10::TypedOperatorHandle<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)> paired_linear;
  c10::OperatorHandle onednn_linear;         // mkldnn::_linear_pointwise, called boxed (PyTorch's own op)
  c10::OperatorHandle onednn_linear_binary;  // mkldnn::_linear_pointwise.binary: (x W^T + b) op other
};

template <class Sig>
c10::TypedOperatorHandle<Sig> kernel(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

const LayerKernels& kernels() {
  // Built on first use (every op is registered by then), read-only afterwards.
  static const LayerKernels k{
      kernel<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("adadepth::rms_norm"),
      kernel<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, double)>(
          "adadepth::add_rms_norm"),
      kernel<void(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                  const at::Tensor&, int64_t, int64_t)>("adadepth::rope_write_kv"),
      kernel<at::Tensor(const at::Tensor&)>("adadepth::silu_and_mul"),
      kernel<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        double)>("adadepth::paged_decode_attention"),
      kernel<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>("adadepth::skinny_linear"),
      kernel<at::Tensor(const at::Tensor&, const at::Tensor&, const OptTensor&)>("adadepth::paired_linear"),
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", ""),
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "binary"),
  };
  return k;
}

// Per layer, in `weights`: the two norm weights and each matmul's plain, k-pair and oneDNN weight;
// gate/up has oneDNN copies of its two halves (gate, up) instead of one of the whole.
enum Weight {
  kInNorm, kPostNorm,
  kQKV, kQKVPaired, kQKVPacked, kO, kOPaired, kOPacked,
  kGateUp, kGateUpPaired, kGatePacked, kUpPacked, kDown, kDownPaired, kDownPacked,
  kPerLayer
};
// Per layer, in `biases` (each may be None).
enum Bias { kQKVBias, kOBias, kGateUpBias, kDownBias, kBiasesPerLayer };

at::Tensor decode_layers(const at::Tensor& h_in, const at::Tensor& cos, const at::Tensor& sin,
                         at::TensorList weights, const c10::List<OptTensor>& biases, at::IntArrayRef active_rows,
                         int64_t start, int64_t stop, const at::Tensor& kv_cache, at::IntArrayRef kv_index,
                         const at::Tensor& slot_mapping, const at::Tensor& context_blocks, at::IntArrayRef group,
                         const at::Tensor& context_lens, int64_t num_heads, int64_t num_kv_heads, int64_t block_size,
                         double eps, double scale, int64_t skinny_max_rows, int64_t paired_max_rows) {
  const int64_t L = static_cast<int64_t>(active_rows.size());
  TORCH_CHECK(0 <= start && start <= stop && stop <= L, "layers [start, stop) out of range");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kPerLayer &&
                  static_cast<int64_t>(biases.size()) == L * kBiasesPerLayer,
              "expected ", kPerLayer, " weights and ", kBiasesPerLayer, " biases per layer");
  TORCH_CHECK(static_cast<int64_t>(kv_index.size()) == L && static_cast<int64_t>(group.size()) == L,
              "kv_index and group need one entry per layer");
  TORCH_CHECK((h_in.scalar_type() == at::kBFloat16 || h_in.scalar_type() == at::kFloat) && h_in.dim() == 3 &&
                  h_in.size(1) == 1,
              "decode_layers takes bf16 or float32 h (B, 1, D): one token per row");
  TORCH_CHECK(kv_cache.dim() == 5 && slot_mapping.dim() == 2 && context_blocks.dim() == 3,
              "expected kv_cache (layers, 2, slots, Hkv, Dh), slot_mapping (groups, N), context_blocks (groups, B, nblk)");
  const int64_t B = h_in.size(0), D = h_in.size(2);
  const int64_t Dh = kv_cache.size(4), q_size = num_heads * Dh;
  const LayerKernels& k = kernels();
  at::Tensor h = h_in.reshape({B, D}).clone();                                  // (B, D), this call's own
  at::Tensor cos2 = cos.reshape({B, -1}), sin2 = sin.reshape({B, -1});          // (B, Dh/2)

  // `plain` names the matmul's first weight; its k-pair and oneDNN copies follow it (enum Weight).
  // Not for gate/up past paired_max_rows (no whole oneDNN copy): `gated` does those.
  auto linear = [&](const at::Tensor& x, int64_t layer, int plain, Bias bias) -> at::Tensor {
    const OptTensor b = biases.get(layer * kBiasesPerLayer + bias);
    const at::Tensor* w = weights.data() + layer * kPerLayer + plain;
    if (x.size(0) <= skinny_max_rows) return k.skinny_linear.call(x, w[0], b);
    if (x.size(0) <= paired_max_rows) return k.paired_linear.call(x, w[1], b);
    // (x, packed weight, bias, "none", [], ""): as PackedLinear calls it.
    torch::jit::Stack stack{x, w[2], b.has_value() ? c10::IValue(*b) : c10::IValue(), c10::IValue("none"),
                            c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue("")};
    k.onednn_linear.callBoxed(&stack);
    return stack[0].toTensor();
  };

  // silu(x gate^T (+b)) * (x up^T (+b)): (n, D) -> (n, I).
  auto gated = [&](const at::Tensor& x, int64_t layer) -> at::Tensor {
    if (x.size(0) <= paired_max_rows) return k.silu_and_mul.call(linear(x, layer, kGateUp, kGateUpBias));
    const at::Tensor* w = weights.data() + layer * kPerLayer;
    const OptTensor b = biases.get(layer * kBiasesPerLayer + kGateUpBias);
    const int64_t half = w[kGateUp].size(0) / 2;
    auto bias_half = [&](int64_t from) { return b.has_value() ? c10::IValue(b->narrow(0, from, half)) : c10::IValue(); };
    torch::jit::Stack stack{x, w[kGatePacked], bias_half(0), c10::IValue("swish"),
                            c10::IValue(c10::List<std::optional<c10::Scalar>>()), c10::IValue("")};
    k.onednn_linear.callBoxed(&stack);
    const at::Tensor gate = stack[0].toTensor();                                  // (n, I), SiLU applied
    stack = {x, gate, w[kUpPacked], bias_half(half), c10::IValue("mul")};
    k.onednn_linear_binary.callBoxed(&stack);
    return stack[0].toTensor();                                                   // (n, I) = up * gate
  };

  for (int64_t i = start; i < stop; ++i) {
    const int64_t n = active_rows[i];
    TORCH_CHECK(0 <= n && n <= B, "active_rows out of range");
    if (n == 0) continue;
    const at::Tensor* w = weights.data() + i * kPerLayer;
    at::Tensor hn = h.narrow(0, 0, n);                                          // (n, D), a view of h
    at::Tensor x = k.rms_norm.call(hn, w[kInNorm], eps);
    at::Tensor qkv = linear(x, i, kQKV, kQKVBias);                               // (n, (H + 2Hkv) Dh)
    at::Tensor kv = kv_cache.select(0, kv_index[i]);                             // (2, slots, Hkv, Dh)
    at::Tensor k_cache = kv.select(0, 0), v_cache = kv.select(0, 1);
    k.rope_write_kv.call(qkv, cos2.narrow(0, 0, n), sin2.narrow(0, 0, n), k_cache, v_cache,
                         slot_mapping.select(0, group[i]), num_heads, num_kv_heads);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({n, num_heads, Dh});           // (n, H, Dh), rows strided
    at::Tensor blocks = context_blocks.select(0, group[i]).narrow(0, 0, n);      // (n, nblk)
    at::Tensor attn = k.paged_attention.call(q, k_cache.view({-1, block_size, num_kv_heads, Dh}),
                                             v_cache.view({-1, block_size, num_kv_heads, Dh}), blocks,
                                             context_lens.narrow(0, 0, n), scale);   // (n, H, Dh)
    at::Tensor o = linear(attn.view({n, q_size}), i, kO, kOBias);                // (n, D)
    auto [total, x2] = k.add_rms_norm.call(hn, o, w[kPostNorm], eps);
    at::Tensor mlp = linear(gated(x2, i), i, kDown, kDownBias);                  // (n, D) -> (n, I) -> (n, D)
    at::Tensor out = total.add_(mlp);                                           // (n, D), a fresh tensor
    if (n == B) {
      h = out;  // every row ran the layer: nothing to keep
    } else {
      hn.copy_(out);  // rows n.. keep their residual stream
    }
  }
  return h.view({B, 1, D});
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adadepth, m) {
  m.def("decode_layers(Tensor h, Tensor cos, Tensor sin, Tensor[] weights, Tensor?[] biases, int[] active_rows, "
        "int start, int stop, Tensor(a!) kv_cache, int[] kv_index, Tensor slot_mapping, Tensor context_blocks, "
        "int[] group, Tensor context_lens, int num_heads, int num_kv_heads, int block_size, float eps, float scale, "
        "int skinny_max_rows, int paired_max_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(adadepth, CPU, m) { m.impl("decode_layers", &decode_layers); }
// oneDNN's packed weights are MkldnnCPU tensors: a call holding them dispatches there.
TORCH_LIBRARY_IMPL(adadepth, MkldnnCPU, m) { m.impl("decode_layers", &decode_layers); }
