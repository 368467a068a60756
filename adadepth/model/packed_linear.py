"""CPU matmuls through oneDNN with weights packed once, instead of MKL's sgemm on every call.

Why: a decode step multiplies a handful of rows (M = batch size) by every weight matrix. For
such skinny products PyTorch's default CPU path re-reads the plain row-major weight on every call,
while oneDNN's inner product on a weight reordered once into its blocked layout runs them faster.
This is what Inductor's CPU "weight prepack" does; here it is applied to the plain model by hand.

`pack_linears(model)` swaps each `nn.Linear` for a `PackedLinear` that shares the very same
Parameter objects, so `state_dict()` keys and values are unchanged. A packed copy is made
lazily and rebuilt if the weight is modified in place (tracked through `weight._version`),
so loading new weights can never leave a stale packed copy behind. Anything the packed path
does not cover (autograd, dtypes other than fp32 and bf16, bf16 on CPUs where oneDNN has no bf16
path, mixed dtypes, non-CPU tensors, builds without oneDNN) falls back to `F.linear`.

bf16: on CPUs with AVX512-BF16 or AMX, oneDNN's bf16 inner product on packed weights reads half the
bytes of fp32 and accumulates in fp32 (a decode step is bound by reading the weights).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from adadepth.kernels.paired_linear import pack_for_kernel


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_bf16_available() -> bool:
    """Whether oneDNN packs and multiplies bf16 weights on this CPU (it refuses without AVX512-BW/VL/DQ
    or AVX-NE-CONVERT; bf16 products then go through F.linear)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return supported is not None and bool(supported())


class PackedLinear(nn.Module):
    """y = x @ W.T + b, like nn.Linear, computed by oneDNN on a pre-packed copy of W."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight            # (out, in): the same Parameter, not a copy
        self.bias = linear.bias
        self._packed: torch.Tensor | None = None
        self._packed_key: tuple | None = None
        self._dtypes = (torch.float32, torch.bfloat16) if onednn_bf16_available() else (torch.float32,)
        # bf16 products of at most `skinny_max_rows` rows go to this kernel instead (use_skinny), and
        # those of at most `paired_max_rows` (bf16 or float32) to the paired kernel, on a copy packed
        # for it (use_paired).
        self.skinny = None
        self.paired = None
        self.paired_dtypes: tuple[torch.dtype, ...] = ()
        self.paired_weight_dtype: torch.dtype | None = None   # float16: a float32 weight's copy in float16
        self._paired_w: torch.Tensor | None = None
        self._paired_key: tuple | None = None
        self._halves: tuple[torch.Tensor, torch.Tensor] | None = None
        self._halves_key: tuple | None = None

    # Decode steps of the default model on a 2-core Zen 4 (AVX512-BF16), the two paths interleaved:
    # faster with the skinny kernel at batch 1 to 4 (benchmarks/results/skinny_linear.json); it
    # takes at most 4 rows.
    skinny_max_rows = 4

    def use_skinny(self, kernel) -> None:
        """Route bf16 products of a few rows to `kernel(x (M, K), w (N, K), bias) -> (M, N)`
        (None: oneDNN for all), where the shapes fit it (K a multiple of 32, N of 16)."""
        fits = self.in_features % 32 == 0 and self.out_features % 16 == 0
        self.skinny = kernel if fits else None

    # Products of up to 256 rows (decode steps, with the prompt chunks they carry): with the paired
    # kernel's register tiles 1.01-1.38x faster than oneDNN in bf16 from 8 rows (2-core Zen 4,
    # benchmarks/results/matmul_rows.json) and 1.1-1.9x in float32 from 1 row (2-core Zen 3, AVX2,
    # matmul_rows_fp32.json); from ~384 rows on (prefills) bf16 is ahead of neither beyond the noise.
    paired_max_rows = 256

    def use_paired(self, kernel, dtypes: tuple[torch.dtype, ...] = (),
                   weight_dtype: torch.dtype | None = None) -> None:
        """Route products of up to paired_max_rows rows in one of `dtypes` (bf16: only those past
        the skinny kernel's rows) to `kernel(x (M, K), w_paired, bias) -> (M, N)` on the copy
        `pack_for_kernel` makes (None: oneDNN), where the shapes fit it (K even, N a multiple of 16).
        `weight_dtype` float16 keeps a float32 weight's copy in float16 (the kernel must take it;
        the products equal the other paths' only if the weight holds float16 values: the engine
        rounds it first, `AdaptiveLlama.round_weights`). That copy is made here, at load, so that
        the first decode step does not pay for it; it is rebuilt if the weight changes."""
        if kernel is not None and not dtypes:
            raise ValueError("use_paired needs the dtypes the kernel takes")
        if weight_dtype not in (None, torch.float16):
            raise ValueError(f"the paired kernel's copy of a float32 weight is float32 or float16, not {weight_dtype}")
        self.paired_weight_dtype = weight_dtype
        fits = self.in_features % 2 == 0 and self.out_features % 16 == 0
        self.paired = kernel if fits else None
        self.paired_dtypes = tuple(dtypes) if self.paired is not None else ()
        if self.paired is None:
            self._paired_w = self._paired_key = None
        elif self.weight.dtype in self.paired_dtypes and self.weight.device.type == "cpu":
            self.paired_weight()

    def takes_paired(self, dtype: torch.dtype) -> bool:
        return self.paired is not None and dtype in self.paired_dtypes

    def _weight_key(self) -> tuple:
        """What identifies the weight's current values: a copy made from it is stale once this changes.
        Inference tensors (made under torch.inference_mode) carry no version counter."""
        w = self.weight
        return w.data_ptr(), None if w.is_inference() else w._version, w.shape

    def paired_weight(self) -> torch.Tensor:
        key = self._weight_key()
        if self._paired_w is None or self._paired_key != key:
            w = self.weight.detach()
            # bf16 (N/16, K/2, 16, 2); float32 (N/8, K, 8) in float32 or paired_weight_dtype
            self._paired_w = pack_for_kernel(w, self.paired_weight_dtype if w.dtype == torch.float32 else None)
            self._paired_key = key
        return self._paired_w

    def _can_pack(self, x: torch.Tensor) -> bool:
        w = self.weight
        return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype in self._dtypes
                and w.dtype == x.dtype and (self.bias is None or self.bias.dtype == x.dtype)
                and not (torch.is_grad_enabled() and w.requires_grad))

    def packed_weight(self) -> torch.Tensor:
        w = self.weight
        key = self._weight_key()
        if self._packed is None or self._packed_key != key:
            # batch_size hint None: one layout that serves decode (M = batch) and prefill alike.
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)
            self._packed_key = key
        return self._packed

    # Whether silu_and_mul runs in oneDNN's epilogues (off: the A/B's other side).
    fuse_gate = True

    def packed_halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """oneDNN copies of the weight's first and second half of rows: the gate and the up
        projection of a fused gate/up weight (`silu_and_mul`)."""
        key = self._weight_key()
        if self._halves is None or self._halves_key != key:
            half = self.out_features // 2
            w = self.weight.detach()
            self._halves = (torch.ops.mkldnn._reorder_linear_weight(w[:half].contiguous(), None),
                            torch.ops.mkldnn._reorder_linear_weight(w[half:].contiguous(), None))
            self._halves_key = key
        return self._halves

    def _takes_onednn(self, x: torch.Tensor) -> bool:
        """Whether forward(x) is oneDNN's product on the packed copy (not F.linear, not a kernel)."""
        if not self._can_pack(x):
            return False
        rows = x.numel() // self.in_features
        return not ((x.dtype == torch.bfloat16 and self.skinny is not None and rows <= self.skinny_max_rows)
                    or (self.takes_paired(x.dtype) and rows <= self.paired_max_rows))

    def silu_and_mul(self, x: torch.Tensor, reference) -> torch.Tensor:
        """silu(x @ Wg^T + bg) * (x @ Wu^T + bu), this weight's rows being [Wg; Wu] (a gated MLP's
        gate/up projection): x (..., in) -> (..., out / 2). `reference` (the layer's SiLU-and-multiply
        op) finishes the product elsewhere.

        On oneDNN's path the SiLU and the multiply run in the two matmuls' epilogues (the gate's
        product gets SiLU, the up product is multiplied by it) on float32 sums: the (..., out)
        product is never written and read back, and rounds once instead of twice. Every layer's
        gate/up product with its SiLU-and-multiply ran 1.05-1.07x faster this way at 512-2048 rows
        (default model, bf16, 2-core Zen 4: benchmarks/results/gated_mlp.json)."""
        if not (self.fuse_gate and self._takes_onednn(x)) or self.out_features % 2:
            return reference(self(x))
        gate_w, up_w = self.packed_halves()
        gate_b, up_b = (None, None) if self.bias is None else self.bias.chunk(2)
        gate = torch.ops.mkldnn._linear_pointwise(x, gate_w, gate_b, "swish", [], "")       # (..., I) = silu(x Wg^T + bg)
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, up_w, up_b, "mul")      # (..., I) = (x Wu^T + bu) * gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._can_pack(x):
            return F.linear(x, self.weight, self.bias)
        rows = x.numel() // self.in_features
        if x.dtype == torch.bfloat16 and self.skinny is not None and rows <= self.skinny_max_rows:
            y = self.skinny(x.reshape(rows, self.in_features), self.weight, self.bias)   # (M, K) -> (M, N)
            return y.view(*x.shape[:-1], self.out_features)
        if self.takes_paired(x.dtype) and rows <= self.paired_max_rows:
            y = self.paired(x.reshape(rows, self.in_features), self.paired_weight(), self.bias)   # (M, N)
            return y.view(*x.shape[:-1], self.out_features)
        # (..., in) -> (..., out); oneDNN takes any leading dims and strided rows.
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight(), self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def pack_linears(module: nn.Module) -> int:
    """Replace every nn.Linear under `module` by a PackedLinear (in place); returns how many.
    A no-op (0) when this PyTorch build has no oneDNN."""
    if not onednn_available():
        return 0
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, PackedLinear(child))
            count += 1
        else:
            count += pack_linears(child)
    return count
