#!/usr/bin/env python3
"""GPU check of the batched-skip kernels (kernels/batched_skip.cu).

    python benchmarks/gpu_check.py --out DIR          # on a CUDA machine
    python benchmarks/gpu_check.py --out DIR --dry-run-cpu   # exercises this script on CPU

1. correctness: kernels against the PyTorch reference on fresh random inputs (decode and
   packed-prefill row counts, three hidden sizes, three dtypes), output buffers poisoned with
   NaN so unwritten rows show, inactive rows of `hidden` checked bit for bit, plus CUDA-graph
   replay and odd layouts (unaligned, strided, very wide rows);
2. speed: the kernels and the plain PyTorch path (index_select + RMSNorm / index_add_) timed
   with CUDA events over CUDA-graph replays, as bandwidth against the card's own
   device-to-device copy bandwidth measured in the same run (target: >= 70 % for large N);
3. the hook for the mixed-depth decode step of the default model (adadepth.benchmarks.
   gpu_model_step.run(out_dir), written separately), skipped with a note when absent.

Prints a table, writes DIR/gpu_check.json, exits 1 if a correctness check fails.
With --dry-run-cpu the reference stands in for the kernels on small CPU shapes and timing uses
the wall clock: the figures mean nothing, the script's logic is what gets run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import math
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# Relative and absolute tolerance per dtype: one or two units in the last place of the storage
# dtype, since the kernel and torch sum the squares in different orders.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
EPS = 1e-5
MAX_DEPTH = 30  # layers of the default model
BW_TARGET = 0.70


def load_batched_skip():
    """adadepth.kernels.batched_skip, or the file itself when the package is not installed
    (the package maps kernels/ to adadepth.kernels through package-dir, which a bare checkout
    on sys.path does not reproduce)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    try:
        from adadepth.kernels import batched_skip

        return batched_skip
    except Exception:  # not installed, or a sibling package fails to import: use the file
        path = REPO / "kernels" / "batched_skip.py"
        spec = importlib.util.spec_from_file_location("adadepth_kernels_batched_skip", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve their module by name
        spec.loader.exec_module(module)
        return module


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


# -------------------------------------------------------------------------------------------
# Timing
# -------------------------------------------------------------------------------------------


class Timer:
    """Seconds per call of fn(i): CUDA events over CUDA-graph replays (GPU time without the
    Python launch cost), falling back to an eager loop; the wall clock in --dry-run-cpu."""

    def __init__(self, device, dry_run: bool):
        self.device, self.dry_run = device, dry_run

    def __call__(self, fn, iters: int = 20, reps: int = 5, graph: bool = True) -> tuple[float, str]:
        if self.dry_run:
            fn(0)
            t0 = time.perf_counter()
            for i in range(iters):
                fn(i)
            return (time.perf_counter() - t0) / iters, "wall"
        dev = self.device
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for i in range(3):  # warm-up outside the capture (allocator, lazy init)
                fn(i)
        torch.cuda.current_stream(dev).wait_stream(side)
        def run_eager():
            for i in range(iters):
                fn(i)

        run, how = run_eager, "eager"
        if graph:
            try:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for i in range(iters):
                        fn(i)
                run, how = g.replay, "graph"
            except Exception:  # e.g. an op that cannot be captured: time it eagerly
                torch.cuda.synchronize(dev)
        run()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / 1e3 / (reps * iters), how


def copy_bandwidth(timer: Timer, device, dry_run: bool) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    nbytes = (64 << 20) if dry_run else (2 << 30)
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    # Eager: a captured copy_ becomes a graph memcpy node, which ran at about 2/3 of the
    # kernel copy's speed on an H200. Each copy is long enough to hide the launch.
    secs, _ = timer(lambda i: y.copy_(x), iters=10, reps=3, graph=False)
    return 2 * nbytes / secs


def hf_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The plain PyTorch RMSNorm (Hugging Face Llama), the baseline the kernels replace."""
    xf = x.float()  # (M, D)
    var = xf.pow(2).mean(-1, keepdim=True)  # (M, 1)
    return w * (xf * torch.rsqrt(var + eps)).to(x.dtype)  # (M, D)


def time_case(
    K, bs, timer, device, dtype, n, dim, frac, l2_bytes, copy_bw, with_torch: bool = True
) -> dict:
    """Gather+norm and scatter+add (+fused norm) of one batch, kernels vs plain PyTorch."""
    elem = dtype.itemsize
    depth = (torch.rand(n, device=device) < frac).to(torch.int32)  # (N,): 1 = active
    idx, cnt = bs.active_rows_ref(depth, 0)
    c = int(cnt.item())
    src = idx[:c].long()  # (c,) the PyTorch path needs the count on the host
    row_bytes = c * dim * elem
    # Enough separate batches that one pass over them does not fit in L2: the loop would
    # otherwise re-read rows the previous call left in L2 and beat DRAM.
    per_set = 2 * row_bytes  # the least traffic of the three operations
    n_sets = max(1, min(8, math.ceil(4 * l2_bytes / max(per_set, 1))))
    sets = []
    for _ in range(n_sets):
        sets.append((
            torch.randn(n, dim, device=device).to(dtype),  # hidden (N, D)
            torch.randn(n, dim, device=device).to(dtype),  # update (N, D)
            torch.empty(n, dim, dtype=dtype, device=device),  # out (N, D)
        ))
    w = torch.randn(dim, device=device).to(dtype)  # (D,)
    normed = torch.empty(n, dim, dtype=dtype, device=device)  # (N, D)
    upd_c = [s[1][:c] for s in sets]  # (c, D) compacted updates for index_add_

    def pick(i):
        return sets[i % n_sets]

    ops = {
        "gather_rmsnorm": (
            2 * row_bytes,
            lambda i: K.gather_rmsnorm(pick(i)[0], idx, cnt, w, EPS, pick(i)[2]),
            lambda i: hf_rmsnorm(pick(i)[0].index_select(0, src), w, EPS),
        ),
        "scatter_add": (
            3 * row_bytes,
            lambda i: K.scatter_residual_add(pick(i)[0], pick(i)[1], idx, cnt, 0.5),
            lambda i: pick(i)[0].index_add_(0, src, upd_c[i % n_sets], alpha=0.5),
        ),
        "scatter_add+norm": (
            4 * row_bytes,
            lambda i: K.scatter_residual_add(pick(i)[0], pick(i)[1], idx, cnt, 0.5, w, EPS, normed),
            lambda i: hf_rmsnorm(
                pick(i)[0].index_add_(0, src, upd_c[i % n_sets], alpha=0.5).index_select(0, src),
                w, EPS,
            ),
        ),
    }
    row = {"dtype": DTYPE_NAMES[dtype], "rows": n, "dim": dim, "active": c, "sets": n_sets}
    for name, (nbytes, kernel_fn, torch_fn) in ops.items():
        t_k, how = timer(kernel_fn)
        t_t = timer(torch_fn)[0] if with_torch else float("nan")
        row[name] = {
            "kernel_us": t_k * 1e6,
            "torch_us": t_t * 1e6,
            "speedup": t_t / t_k if t_k > 0 else None,
            "kernel_GBps": nbytes / t_k / 1e9 if t_k > 0 else None,
            "frac_of_copy_bw": nbytes / t_k / copy_bw if t_k > 0 else None,
            "timing": how,
        }
    return row


def eager_call_us(K, device, dry_run: bool) -> dict:
    """Host cost of one eager call (argument checks + launch), decode-sized."""
    n, dim = 64, 576
    hidden = torch.randn(n, dim, device=device).to(torch.bfloat16)
    w = torch.ones(dim, dtype=torch.bfloat16, device=device)
    depth = torch.randint(0, MAX_DEPTH + 1, (n,), dtype=torch.int32, device=device)
    idx, cnt = K.active_rows(depth, MAX_DEPTH // 2)
    out = torch.empty_like(hidden)
    calls = 20 if dry_run else 500
    result = {}
    for name, fn in (
        ("active_rows", lambda: K.active_rows(depth, MAX_DEPTH // 2, idx, cnt)),
        ("gather_rmsnorm", lambda: K.gather_rmsnorm(hidden, idx, cnt, w, EPS, out)),
    ):
        fn()
        if not dry_run:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if not dry_run:
            torch.cuda.synchronize(device)
        result[name] = (time.perf_counter() - t0) / calls * 1e6
    return result


def run_perf(K, bs, device, dry_run: bool) -> dict:
    timer = Timer(device, dry_run)
    copy_bw = copy_bandwidth(timer, device, dry_run)
    l2 = 0 if dry_run else getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    if dry_run:
        cases = [(torch.bfloat16, 512, 576, 0.5), (torch.float32, 64, 64, 1.0)]
    else:
        cases = [
            (dt, 16384, dim, frac)
            for dt in (torch.bfloat16, torch.float16, torch.float32)
            for dim in (2048, 4096)
            for frac in (1.0, 0.5)
        ]
        cases += [(torch.bfloat16, 4096, dim, 0.5) for dim in (576, 2048, 4096)]
        cases += [(torch.bfloat16, 16384, 576, 0.5)]
        cases += [(torch.bfloat16, 1, dim, 1.0) for dim in (576, 4096)]
        cases += [(torch.bfloat16, n, dim, 0.5) for n in (64, 256) for dim in (576, 4096)]
    rows = [time_case(K, bs, timer, device, *case, l2, copy_bw) for case in cases]

    # Launch-shape sweep of the row kernels against the defaults (4 vectors per thread, grid
    # picked by block size): 2 vectors per thread, and each grid kind forced. Each variant is
    # also checked for correctness on one batch, so a switch of the default stays covered.
    sweep = []
    sweep_cases = [(torch.bfloat16, 512, 576, 0.5)] if dry_run else [
        (torch.bfloat16, 16384, dim, frac) for dim in (576, 2048, 4096) for frac in (0.5, 1.0)
    ] + [(torch.float32, 16384, 4096, 1.0)]
    for vpt, persistent in ((2, None), (4, True), (4, False)):
        Kv = ReferenceAsKernels(bs) if dry_run else bs.BatchedSkipKernels(
            device, vectors_per_thread=vpt, persistent=persistent
        )
        torch.manual_seed(20_000 + vpt)
        ok = all(c.passed for c in check_case(
            Kv, bs, torch.bfloat16, 4096, 2048, MAX_DEPTH // 2, True, device
        ))
        for case in sweep_cases:
            r = time_case(Kv, bs, timer, device, *case, l2, copy_bw, with_torch=False)
            sweep.append({"vectors_per_thread": vpt, "persistent": persistent,
                          "variant_correct": ok, **r})

    compaction = {}
    for n in ((256, 4096) if dry_run else (256, 4096, 16384)):
        depth = torch.randint(0, MAX_DEPTH + 1, (n,), dtype=torch.int32, device=device)
        idx = torch.empty(n, dtype=torch.int32, device=device)
        cnt = torch.empty(1, dtype=torch.int32, device=device)
        secs, _ = timer(lambda i: K.active_rows(depth, MAX_DEPTH // 2, idx, cnt))
        compaction[str(n)] = secs * 1e6

    # The bandwidth target applies to large batches with rows wide enough to stream.
    targets = [
        r[op]["frac_of_copy_bw"] >= BW_TARGET
        for r in rows
        if r["rows"] >= 16384 and r["dim"] >= 2048
        for op in ("gather_rmsnorm", "scatter_add", "scatter_add+norm")
    ]
    return {
        "copy_bandwidth_GBps": copy_bw / 1e9,
        "l2_bytes": l2,
        "cases": rows,
        "launch_sweep": sweep,
        "active_rows_us": compaction,
        "eager_host_us_per_call": eager_call_us(K, device, dry_run),
        "bw_target": BW_TARGET,
        "bw_target_met": bool(targets) and all(targets),
    }


# ===========================================================================================
# HOOK: mixed-depth decode step of the default model vs full depth.
# Implemented elsewhere as adadepth.benchmarks.gpu_model_step (benchmarks/gpu_model_step.py)
# with run(out_dir) -> JSON-serialisable dict; this script only finds and calls it.
# ===========================================================================================


def run_model_step_hook(out_dir: Path, dry_run: bool) -> dict:
    path = REPO / "benchmarks" / "gpu_model_step.py"
    try:
        module = importlib.import_module("adadepth.benchmarks.gpu_model_step")
    except Exception:  # package not installed (or not importable): try the file itself
        module = None
        if not path.exists():
            return {"status": "skipped", "note": "adadepth.benchmarks.gpu_model_step not present"}
        try:
            spec = importlib.util.spec_from_file_location("adadepth_gpu_model_step", path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        except Exception:
            return {"status": "error", "error": traceback.format_exc(limit=5)}
    if dry_run:
        return {"status": "skipped", "note": "present; not run with --dry-run-cpu"}
    try:
        result = module.run(out_dir)
        json.dumps(result)  # fail here, not when the report is written
        return {"status": "ok", "result": result}
    except Exception:
        return {"status": "error", "error": traceback.format_exc(limit=5)}


# -------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------


def print_report(report: dict) -> None:
    print(f"\n== {report['card']} | torch {report['torch']} | arch {report.get('arch')} | "
          f"cuda-core {report['cuda-core']} | nvrtc {report['nvidia-cuda-nvrtc']}")
    checks = report.get("checks", [])
    failed = [c for c in checks if not c["passed"]]
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} checks passed")
    worst: dict[str, float] = {}
    for c in checks:
        key = f"{c['name']:<18} {c['dtype']}"
        worst[key] = max(worst.get(key, 0.0), c["max_err_over_tol"])
    for key, ratio in sorted(worst.items()):
        print(f"  {key:<24} worst err/tol {ratio:.3f}")
    for c in failed[:20]:
        print(f"  FAIL {c['name']} {c['dtype']} rows={c['rows']} dim={c['dim']} "
              f"active={c['active']} err/tol={c['max_err_over_tol']:.3g} {c['notes']}")
    perf = report.get("perf")
    if perf:
        print(f"\ncopy bandwidth {perf['copy_bandwidth_GBps']:.0f} GB/s (read+write); "
              f"target {perf['bw_target']:.0%} for rows>=16384, dim>=2048: "
              f"{'met' if perf['bw_target_met'] else 'NOT met'}")
        print(f"{'dtype':<5} {'rows':>6} {'dim':>5} {'active':>6} | "
              + " | ".join(f"{op:<28}" for op in ("gather_rmsnorm", "scatter_add", "scatter_add+norm")))
        print(f"{'':<26} | " + " | ".join(f"{'us  torch_us  %copy  x':<28}" for _ in range(3)))
        for r in perf["cases"]:
            cells = []
            for op in ("gather_rmsnorm", "scatter_add", "scatter_add+norm"):
                o = r[op]
                frac, speedup = o["frac_of_copy_bw"] or 0.0, o["speedup"] or 0.0
                cells.append(f"{o['kernel_us']:7.1f} {o['torch_us']:8.1f} "
                             f"{100 * frac:5.0f}% {speedup:5.1f}")
            print(f"{r['dtype']:<5} {r['rows']:>6} {r['dim']:>5} {r['active']:>6} | " + " | ".join(cells))
        for r in perf["launch_sweep"]:
            grid = {None: "auto grid ", True: "persistent", False: "per-row   "}[r["persistent"]]
            print(f"  vpt {r['vectors_per_thread']} {grid}"
                  f"{'' if r['variant_correct'] else ' (WRONG)'}: "
                  f"{r['dtype']} {r['rows']}x{r['dim']} a={r['active']} "
                  + ", ".join(f"{op} {r[op]['kernel_us']:.1f} us "
                              f"({100 * (r[op]['frac_of_copy_bw'] or 0):.0f}%)"
                              for op in ("gather_rmsnorm", "scatter_add", "scatter_add+norm")))
        print("active_rows us: " + ", ".join(f"N={k}: {v:.1f}" for k, v in perf["active_rows_us"].items()))
        print("eager host us/call: " + ", ".join(
            f"{k}: {v:.1f}" for k, v in perf["eager_host_us_per_call"].items()))
    print(f"\nmodel step hook: {report['model_step'].get('status')} "
          f"{report['model_step'].get('note', '')}")
    for key in ("build_error", "correctness_error", "perf_error"):
        if key in report:
            print(f"\n{key}:\n{report[key]}")
    print(f"\nall correct: {report['all_correct']}  ({report['elapsed_s']:.1f} s)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run the script logic on CPU with the reference as the kernel")
    parser.add_argument("--skip-perf", action="store_true", help="correctness only")
    parser.add_argument("--quick", action="store_true",
                        help="small correctness shapes (e.g. under compute-sanitizer)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    bs = load_batched_skip()
    dry = args.dry_run_cpu
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: use --dry-run-cpu to exercise the script on CPU")
    device = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    report: dict = {
        "card": "cpu (dry run)" if dry else torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dry_run": dry,
        "python": sys.version.split()[0],
    }
    for dist in ("cuda-core", "cuda-bindings", "nvidia-cuda-nvrtc"):
        try:
            report[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            report[dist] = None

    K = None
    try:
        t = time.perf_counter()
        K = ReferenceAsKernels(bs) if dry else bs.BatchedSkipKernels(device)
        report["build_s"] = time.perf_counter() - t
        report["arch"] = None if dry else K.arch
    except Exception:
        report["build_error"] = traceback.format_exc()

    checks: list[Check] = []
    if K is not None:
        try:
            checks = run_correctness(K, bs, device, dry, args.quick)
        except Exception:
            report["correctness_error"] = traceback.format_exc()
        report["correctness_s"] = time.perf_counter() - t0
    report["checks"] = [asdict(c) for c in checks]
    report["all_correct"] = (
        K is not None and bool(checks) and "correctness_error" not in report
        and all(c.passed for c in checks)
    )

    if K is not None and not args.skip_perf:
        try:
            report["perf"] = run_perf(K, bs, device, dry)
        except Exception:
            report["perf_error"] = traceback.format_exc()

    report["model_step"] = run_model_step_hook(args.out, dry)
    report["elapsed_s"] = time.perf_counter() - t0
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    return 0 if report["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
