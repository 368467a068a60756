"""GPU check, speed part: the batched-skip kernels and the plain PyTorch path (index_select +
RMSNorm / index_add_) timed with CUDA events over CUDA-graph replays, as bandwidth against the
card's device-to-device copy bandwidth measured in the same run. Run by benchmarks/gpu_check.py.
"""
from __future__ import annotations

import math
import time

import torch

from adadepth.benchmarks.gpu_check_correctness import DTYPE_NAMES, EPS, MAX_DEPTH, ReferenceAsKernels, check_case

BW_TARGET = 0.70  # kernels' share of the copy bandwidth for large N (the kernels' target)

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
