"""GPU check, correctness part: the batched-skip kernels against their PyTorch reference.

Fresh random inputs (decode and packed-prefill row counts, three hidden sizes, three dtypes),
output buffers poisoned with NaN so unwritten rows show, inactive rows of `hidden` compared bit
for bit, odd layouts (unaligned, strided, very wide rows) and a CUDA-graph replay. Run by
benchmarks/gpu_check.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Relative and absolute tolerance per dtype: one or two units in the last place of the storage
# dtype, since the kernel and torch sum the squares in different orders.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
EPS = 1e-5
MAX_DEPTH = 30  # layers of the default model


class ReferenceAsKernels:
    """--dry-run-cpu stand-in for BatchedSkipKernels: the same methods, run by the reference."""

    def __init__(self, bs):
        self.active_rows = bs.active_rows_ref
        self.gather_rmsnorm = bs.gather_rmsnorm_ref
        self.scatter_residual_add = bs.scatter_residual_add_ref


@dataclass
class Check:
    name: str
    dtype: str
    rows: int
    dim: int
    active: int
    passed: bool
    max_abs_err: float = 0.0
    max_err_over_tol: float = 0.0  # worst |err| / (atol + rtol*|ref|); <= 1 passes
    notes: list[str] = field(default_factory=list)


# -------------------------------------------------------------------------------------------
# Inputs and comparisons
# -------------------------------------------------------------------------------------------


def bits(x: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so NaNs and signed zeros compare exactly."""
    return x.view(torch.int32 if x.element_size() == 4 else torch.int16)


def row_depths(n: int, packed: bool, device) -> torch.Tensor:
    """Per-row depth: one random depth per row (decode) or per sequence of a packed prefill."""
    if not packed:
        return torch.randint(0, MAX_DEPTH + 1, (n,), dtype=torch.int32, device=device)  # (N,)
    lens = []
    while sum(lens) < n:  # variable-length sequences that tile exactly n tokens
        lens.append(min(int(torch.randint(1, 2048, ()).item()), n - sum(lens)))
    per_seq = torch.randint(0, MAX_DEPTH + 1, (len(lens),), dtype=torch.int32)  # (S,)
    return torch.repeat_interleave(per_seq, torch.tensor(lens)).to(device)  # (N,)


def close(actual: torch.Tensor, expected: torch.Tensor, dtype) -> tuple[bool, float, float]:
    """(within tolerance and finite, max abs error, max error / tolerance)."""
    if actual.numel() == 0:
        return True, 0.0, 0.0
    a, e = actual.float(), expected.float()
    diff = (a - e).abs()
    tol = TOL[dtype] * (1.0 + e.abs())
    ratio = (diff / tol).max().item()
    finite = bool(torch.isfinite(a).all().item())
    return finite and ratio <= 1.0, diff.max().item(), ratio


def poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def same_layout_copy(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(copy of x with x's strides and storage offset, its NaN-filled storage, mask of the
    storage elements outside the view), so writes outside a strided view can be caught."""
    extent = x.storage_offset() + 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    storage = poisoned((extent,), x.dtype, x.device)  # (extent,)
    y = torch.as_strided(storage, x.shape, x.stride(), x.storage_offset())  # x's shape/strides
    y.copy_(x)
    outside = torch.ones(extent, dtype=torch.bool, device=x.device)  # (extent,)
    # x's shape/strides over the mask: clear the elements the view covers
    torch.as_strided(outside, x.shape, x.stride(), x.storage_offset()).fill_(False)
    return y, storage, outside


# -------------------------------------------------------------------------------------------
# Correctness
# -------------------------------------------------------------------------------------------


def check_case(K, bs, dtype, n, dim, rank, packed, device, hidden=None) -> list[Check]:
    """All three operations on one batch; `hidden` may be a prepared (strided/offset) view."""
    dt = DTYPE_NAMES[dtype]
    if hidden is None:
        hidden = torch.randn(n, dim, device=device).to(dtype)  # (N, D)
    depth = row_depths(n, packed, device)  # (N,)
    weight = (1 + 0.1 * torch.randn(dim, device=device)).to(dtype)  # (D,)
    next_w = (1 + 0.1 * torch.randn(dim, device=device)).to(dtype)  # (D,)
    update = torch.randn(n, dim, device=device).to(dtype)  # (N, D)
    checks = []

    # Compaction, into buffers filled with values it must overwrite.
    idx_k = torch.full((n,), 0x7FFFFFF, dtype=torch.int32, device=device)
    cnt_k = torch.full((1,), -7, dtype=torch.int32, device=device)
    K.active_rows(depth, rank, idx_k, cnt_k)
    idx, cnt = bs.active_rows_ref(depth, rank)
    c = int(cnt.item())
    ok = torch.equal(idx_k, idx) and torch.equal(cnt_k, cnt)
    checks.append(Check("active_rows", "int32", n, dim, c, ok))

    # Gather + RMSNorm (the reference's indices, so a compaction bug does not cascade).
    out_k, g_k = poisoned((n, dim), dtype, device), poisoned((n, dim), dtype, device)
    K.gather_rmsnorm(hidden, idx, cnt, weight, EPS, out_k, g_k)
    out_r = bs.gather_rmsnorm_ref(hidden, idx, cnt, weight, EPS)
    ok, err, ratio = close(out_k[:c], out_r[:c], dtype)
    notes = []
    if not torch.isnan(out_k[c:].float()).all():
        ok, notes = False, notes + ["rows >= count written"]
    src = idx[:c].long()  # (c,)
    if not torch.equal(bits(g_k[:c]), bits(hidden.index_select(0, src))):
        ok, notes = False, notes + ["gathered rows differ"]
    if not torch.isnan(g_k[c:].float()).all():
        ok, notes = False, notes + ["gathered rows >= count written"]
    checks.append(Check("gather_rmsnorm", dt, n, dim, c, ok, err, ratio, notes))

    inactive = torch.ones(n, dtype=torch.bool, device=device)  # (N,)
    inactive[src] = False
    for scale, fuse in ((1.0, False), (0.37, True)):
        h_k, storage_k, outside_k = same_layout_copy(hidden)  # keeps a strided/offset layout
        h_r = hidden.clone()
        normed_k = poisoned((n, dim), dtype, device) if fuse else None
        K.scatter_residual_add(h_k, update, idx, cnt, scale, next_w if fuse else None, EPS, normed_k)
        normed_r = bs.scatter_residual_add_ref(
            h_r, update, idx, cnt, scale, next_w if fuse else None, EPS
        )
        ok, err, ratio = close(h_k[src], h_r[src], dtype)
        notes = []
        if not torch.equal(bits(h_k[src]), bits(h_r[src])):
            notes.append("active rows not bit-exact (within tolerance)" if ok else "active rows differ")
        if not torch.equal(bits(h_k[inactive]), bits(hidden[inactive])):
            ok, notes = False, notes + ["inactive rows changed"]
        if not torch.isnan(storage_k[outside_k].float()).all():
            ok, notes = False, notes + ["wrote outside the hidden view"]
        if fuse:
            ok_n, err_n, ratio_n = close(normed_k[:c], normed_r[:c], dtype)
            ok, err, ratio = ok and ok_n, max(err, err_n), max(ratio, ratio_n)
            if not torch.isnan(normed_k[c:].float()).all():
                ok, notes = False, notes + ["normed rows >= count written"]
            # The fused norm must equal the kernels' own unfused scatter-then-gather.
            # Same layout as h_k, so both launches pick the same kernel variant and block
            # size, hence the same reduction order.
            h_u = same_layout_copy(hidden)[0]
            K.scatter_residual_add(h_u, update, idx, cnt, scale)
            unfused = K.gather_rmsnorm(h_u, idx, cnt, next_w, EPS)
            if not torch.equal(bits(normed_k[:c]), bits(unfused[:c])):
                ok, notes = False, notes + ["fused != scatter then gather"]
        name = "scatter_add+norm" if fuse else "scatter_add"
        checks.append(Check(name, dt, n, dim, c, ok, err, ratio, notes))
    return checks


def check_cuda_graph(K, bs, device) -> Check:
    """Capture compaction + gather + scatter once, change the depths, replay: the replay must
    follow the new depths (count lives on the device, nothing is baked in at capture)."""
    n, dim, dtype = 256, 576, torch.bfloat16
    depth = torch.zeros(n, dtype=torch.int32, device=device)  # static input buffer
    hidden = torch.randn(n, dim, device=device).to(dtype)  # (N, D)
    weight = torch.randn(dim, device=device).to(dtype)  # (D,)
    update = torch.randn(n, dim, device=device).to(dtype)  # (N, D)
    idx = torch.empty(n, dtype=torch.int32, device=device)
    cnt = torch.empty(1, dtype=torch.int32, device=device)
    out = torch.empty(n, dim, dtype=dtype, device=device)
    work = hidden.clone()

    def step():
        K.active_rows(depth, 11, idx, cnt)
        K.gather_rmsnorm(work, idx, cnt, weight, EPS, out)
        K.scatter_residual_add(work, update, idx, cnt, 0.5)

    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    depth.copy_(row_depths(n, False, device))
    work.copy_(hidden)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize(device)

    idx_r, cnt_r = bs.active_rows_ref(depth, 11)
    c = int(cnt_r.item())
    out_r = bs.gather_rmsnorm_ref(hidden, idx_r, cnt_r, weight, EPS)
    h_r = hidden.clone()
    bs.scatter_residual_add_ref(h_r, update, idx_r, cnt_r, 0.5)
    ok = torch.equal(idx, idx_r) and torch.equal(cnt, cnt_r)
    ok_o, err, ratio = close(out[:c], out_r[:c], dtype)
    ok_h, err_h, ratio_h = close(work, h_r, dtype)
    return Check("cuda_graph_replay", "bf16", n, dim, c, ok and ok_o and ok_h,
                 max(err, err_h), max(ratio, ratio_h))


def run_correctness(K, bs, device, dry_run: bool, quick: bool = False) -> list[Check]:
    if dry_run or quick:  # small shapes: the reference on CPU, or under compute-sanitizer
        decode, prefill, dims = [1, 64], [1024], [64, 576]
    else:
        decode, prefill, dims = [1, 64, 256], [4096, 16384], [576, 2048, 4096]
    checks: list[Check] = []
    seed = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in decode + prefill:
            for dim in dims:
                # all rows active, about half, none
                for rank in (-1, MAX_DEPTH // 2, MAX_DEPTH):
                    seed += 1
                    torch.manual_seed(seed)
                    checks += check_case(K, bs, dtype, n, dim, rank, n in prefill, device)

    # Layouts that take the other kernel variants.
    torch.manual_seed(10_000)
    base = torch.randn(300, 600, device=device).to(torch.bfloat16)
    layouts = [
        ("unaligned dim 578", torch.bfloat16, 300, 578, None),  # dim % 8 != 0 -> scalar
        ("offset view", torch.bfloat16, 300, 576, base[:, 1:577]),  # misaligned pointer
        ("strided rows", torch.bfloat16, 300, 512, base[:, 8:520]),  # row stride 600
        ("wide fp32 8192", torch.float32, 64, 8192, None),  # largest cached fp32 row
        ("wide fp32 12288", torch.float32, 64, 12288, None),  # vector stream variant
        ("wide bf16 20480", torch.bfloat16, 64, 20480, None),
    ]
    for note, dtype, n, dim, hidden in layouts:
        for c in check_case(K, bs, dtype, n, dim, MAX_DEPTH // 2, False, device, hidden):
            c.notes.insert(0, note)
            checks.append(c)
    if not dry_run:
        checks.append(check_cuda_graph(K, bs, device))
    return checks
