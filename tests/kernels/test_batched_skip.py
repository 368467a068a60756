"""Batched-skip kernels: the PyTorch reference against a per-row loop oracle, launch planning,
and compilation of the CUDA source (NVRTC through cuda-python, and nvcc when on PATH).

No GPU is needed: the kernels themselves are checked on a GPU by benchmarks/gpu_check.py.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest
import torch

from adadepth.kernels import batched_skip as bs
from adadepth.kernels import nvrtc_build

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Per-dtype tolerance: the oracle sums squares in another order, which can move a result by
# one unit in the last place of the storage dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
EPS = 1e-5


# -------------------------------------------------------------------------------------------
# Naive oracle: one row at a time in plain Python loops
# -------------------------------------------------------------------------------------------


def oracle_active(depths: list[int], rank: int) -> list[int]:
    return [i for i, d in enumerate(depths) if d > rank]


def oracle_rmsnorm_row(row: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = [float(v) for v in row.float()]
    ms = sum(v * v for v in x) / len(x)
    rstd = torch.tensor(1.0 / (ms + eps) ** 0.5, dtype=torch.float32)
    normed = (row.float() * rstd).to(row.dtype)  # (D,) rounded before the weight, as HF does
    return (weight.float() * normed.float()).to(row.dtype)  # (D,)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype], rtol=TOL[dtype])


def bits(x: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so NaNs and signed zeros compare exactly."""
    return x.view(torch.int32 if x.element_size() == 4 else torch.int16)


def make_batch(gen, n_rows: int, dim: int, dtype: torch.dtype, max_depth: int = 12):
    hidden = torch.randn(n_rows, dim, generator=gen).to(dtype)  # (N, D)
    depth = torch.randint(0, max_depth + 1, (n_rows,), generator=gen, dtype=torch.int32)  # (N,)
    weight = (1.0 + 0.1 * torch.randn(dim, generator=gen)).to(dtype)  # (D,)
    return hidden, depth, weight


def packed_prefill_depths(gen, seq_lens: list[int], max_depth: int = 12) -> torch.Tensor:
    """Per-token depth of a packed prefill: every token of a sequence has its request's depth."""
    per_seq = torch.randint(0, max_depth + 1, (len(seq_lens),), generator=gen, dtype=torch.int32)
    return torch.repeat_interleave(per_seq, torch.tensor(seq_lens))  # (sum(seq_lens),)


# Shapes: (rows, hidden). Decode batches, a packed prefill of variable-length sequences and
# sizes that are not multiples of the vector width.
SHAPES = [(1, 64), (5, 576), (64, 128), (37, 100), (300, 96)]


# -------------------------------------------------------------------------------------------
# active_rows
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_rows", [0, 1, 7, 64, 1000, 5000])
def test_active_rows_matches_oracle(n_rows):
    gen = torch.Generator().manual_seed(n_rows)
    depth = torch.randint(0, 10, (n_rows,), generator=gen, dtype=torch.int32)  # unsorted
    for rank in (-1, 0, 4, 9, 10):  # -1: all active, 9 and 10: none active
        idx, count = bs.active_rows(depth, rank)
        expected = oracle_active(depth.tolist(), rank)
        c = int(count.item())
        assert idx.dtype == torch.int32 and idx.shape == (n_rows,)
        assert count.dtype == torch.int32 and count.shape == (1,)
        assert c == len(expected)
        assert idx[:c].tolist() == expected
        assert idx[c:].tolist() == [-1] * (n_rows - c)


def test_active_rows_writes_given_buffers():
    depth = torch.tensor([3, 0, 5, 1, 5], dtype=torch.int32)
    idx_buf = torch.full((5,), 99, dtype=torch.int32)
    count_buf = torch.full((1,), 99, dtype=torch.int32)
    idx, count = bs.active_rows(depth, 2, idx_buf, count_buf)
    assert idx is idx_buf and count is count_buf
    assert idx.tolist() == [0, 2, 4, -1, -1] and count.item() == 3


def test_active_rows_packed_prefill():
    gen = torch.Generator().manual_seed(3)
    seq_lens = [5, 1, 17, 3, 40]
    depth = packed_prefill_depths(gen, seq_lens)
    idx, count = bs.active_rows(depth, 6)
    assert idx[: int(count)].tolist() == oracle_active(depth.tolist(), 6)


# -------------------------------------------------------------------------------------------
# gather_rmsnorm
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_rmsnorm_matches_oracle(dtype, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    hidden, depth, weight = make_batch(gen, *shape, dtype)
    before = hidden.clone()
    for rank in (-1, 3, 12):
        idx, count = bs.active_rows(depth, rank)
        out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: unwritten rows stay NaN
        gathered = torch.full(shape, float("nan"), dtype=dtype)
        ret = bs.gather_rmsnorm(hidden, idx, count, weight, EPS, out=out, gathered=gathered)
        assert ret is out
        rows = oracle_active(depth.tolist(), rank)
        for i, r in enumerate(rows):
            assert_close(out[i], oracle_rmsnorm_row(hidden[r], weight, EPS), dtype)
            assert torch.equal(bits(gathered[i]), bits(hidden[r]))
        assert torch.isnan(out[len(rows):].float()).all()
        assert torch.isnan(gathered[len(rows):].float()).all()
    assert torch.equal(bits(hidden), bits(before))  # read-only


def test_gather_rmsnorm_allocates_and_accepts_3d_hidden():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 3, 32, generator=gen)  # (B, S, D): rows are the B*S tokens
    weight = torch.ones(32)
    idx = torch.tensor([4, 0, -1, -1, -1, -1], dtype=torch.int32)
    count = torch.tensor([2], dtype=torch.int32)
    out = bs.gather_rmsnorm(hidden, idx, count, weight, EPS)
    assert out.shape == (6, 32)
    flat = hidden.view(6, 32)  # (B*S, D)
    assert_close(out[0], oracle_rmsnorm_row(flat[4], weight, EPS), torch.float32)
    assert_close(out[1], oracle_rmsnorm_row(flat[0], weight, EPS), torch.float32)


def test_gather_rmsnorm_strided_rows():
    gen = torch.Generator().manual_seed(1)
    big = torch.randn(10, 80, generator=gen)
    hidden = big[:, 8:72]  # (10, 64) with row stride 80
    weight = torch.randn(64, generator=gen)
    idx, count = bs.active_rows(torch.arange(10, dtype=torch.int32), 4)
    out = torch.full((20, 64), float("nan"))[::2]  # (10, 64) with row stride 128
    bs.gather_rmsnorm(hidden, idx, count, weight, EPS, out=out)
    for i, r in enumerate(range(5, 10)):
        assert_close(out[i], oracle_rmsnorm_row(hidden[r], weight, EPS), torch.float32)


# -------------------------------------------------------------------------------------------
# scatter_residual_add
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [1.0, 0.37])
@pytest.mark.parametrize("fuse_norm", [False, True])
def test_scatter_residual_add_matches_oracle(dtype, shape, scale, fuse_norm):
    gen = torch.Generator().manual_seed(hash((shape, scale)) % 1000)
    hidden, depth, next_w = make_batch(gen, *shape, dtype)
    for rank in (-1, 5, 12):
        h = hidden.clone()
        idx, count = bs.active_rows(depth, rank)
        update = torch.randn(shape, generator=gen).to(dtype)  # (N, D); rows >= count unused
        normed = torch.full(shape, float("nan"), dtype=dtype) if fuse_norm else None
        ret = bs.scatter_residual_add(
            h, update, idx, count, scale, next_w if fuse_norm else None, EPS, normed
        )
        assert ret is normed
        rows = oracle_active(depth.tolist(), rank)
        active = set(rows)
        for r in range(shape[0]):
            if r not in active:  # untouched, bit for bit
                assert torch.equal(bits(h[r]), bits(hidden[r]))
        for i, r in enumerate(rows):
            expected = (hidden[r].float() + update[i].float() * scale).to(dtype)
            assert_close(h[r], expected, dtype)
            if fuse_norm:
                assert_close(normed[i], oracle_rmsnorm_row(h[r], next_w, EPS), dtype)
        if fuse_norm:
            assert torch.isnan(normed[len(rows):].float()).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_next_norm_equals_unfused(dtype):
    """scatter(+norm) gives bit for bit what scatter followed by gather_rmsnorm gives."""
    gen = torch.Generator().manual_seed(7)
    seq_lens = [9, 1, 30, 4]
    depth = packed_prefill_depths(gen, seq_lens)
    n = depth.numel()
    hidden = torch.randn(n, 48, generator=gen).to(dtype)  # (tokens, D)
    weight = torch.randn(48, generator=gen).to(dtype)
    update = torch.randn(n, 48, generator=gen).to(dtype)
    idx, count = bs.active_rows(depth, 4)
    h1, h2 = hidden.clone(), hidden.clone()
    fused = bs.scatter_residual_add(h1, update, idx, count, 0.5, weight, EPS)
    bs.scatter_residual_add(h2, update, idx, count, 0.5)
    unfused = bs.gather_rmsnorm(h2, idx, count, weight, EPS)
    c = int(count)
    assert torch.equal(bits(h1), bits(h2))
    assert torch.equal(bits(fused[:c]), bits(unfused[:c]))


def test_count_zero_touches_nothing():
    gen = torch.Generator().manual_seed(2)
    hidden, depth, weight = make_batch(gen, 16, 32, torch.bfloat16)
    idx, count = bs.active_rows(depth, 100)
    assert int(count) == 0 and idx.tolist() == [-1] * 16
    out = torch.full((16, 32), float("nan"), dtype=torch.bfloat16)
    bs.gather_rmsnorm(hidden, idx, count, weight, EPS, out=out)
    assert torch.isnan(out.float()).all()
    h = hidden.clone()
    normed = torch.full((16, 32), float("nan"), dtype=torch.bfloat16)
    bs.scatter_residual_add(h, torch.ones_like(h), idx, count, 1.0, weight, EPS, normed)
    assert torch.equal(bits(h), bits(hidden)) and torch.isnan(normed.float()).all()


def test_out_of_range_indices_are_skipped():
    hidden = torch.arange(12, dtype=torch.float32).view(4, 3)  # (4, 3)
    idx = torch.tensor([1, -1, 9, 3], dtype=torch.int32)
    count = torch.tensor([4], dtype=torch.int32)
    h = hidden.clone()
    bs.scatter_residual_add(h, torch.ones(4, 3), idx, count)
    assert h[[0, 2]].equal(hidden[[0, 2]])
    assert h[[1, 3]].equal(hidden[[1, 3]] + 1)
    out = torch.full((4, 3), float("nan"))
    bs.gather_rmsnorm(hidden, idx, count, torch.ones(3), EPS, out=out)
    assert torch.isnan(out[[1, 2]]).all() and not torch.isnan(out[[0, 3]]).any()


def test_count_larger_than_index_list_is_clamped():
    hidden = torch.randn(3, 8)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    out = bs.gather_rmsnorm(hidden, idx, torch.tensor([50], dtype=torch.int32), torch.ones(8), EPS)
    assert_close(out[1], oracle_rmsnorm_row(hidden[0], torch.ones(8), EPS), torch.float32)


# -------------------------------------------------------------------------------------------
# Argument checks
# -------------------------------------------------------------------------------------------


def _valid_args():
    hidden = torch.randn(4, 16)
    idx, count = bs.active_rows(torch.tensor([1, 0, 2, 3], dtype=torch.int32), 0)
    return hidden, idx, count, torch.ones(16)


@pytest.mark.parametrize(
    "call",
    [
        lambda h, i, c, w: bs.active_rows(torch.zeros(4, dtype=torch.int64), 0),
        lambda h, i, c, w: bs.active_rows(torch.zeros(2, 2, dtype=torch.int32), 0),
        lambda h, i, c, w: bs.active_rows(torch.zeros(4, dtype=torch.int32), 1.5),
        lambda h, i, c, w: bs.active_rows(torch.zeros(4, dtype=torch.int32), True),
        lambda h, i, c, w: bs.active_rows(torch.zeros(4, dtype=torch.int32), 0, i[:2]),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i.long(), c, w, EPS),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i, c.long(), w, EPS),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i, c, w.double(), EPS),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i, c, w[:8], EPS),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i, c, w, -1.0),
        lambda h, i, c, w: bs.gather_rmsnorm(h.double(), i, c, w.double(), EPS),
        lambda h, i, c, w: bs.gather_rmsnorm(h.t(), i, c, torch.ones(4), EPS),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i, c, w, EPS, out=torch.empty(3, 16)),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i, c, w, EPS, out=h),
        lambda h, i, c, w: bs.gather_rmsnorm(h, i, c, w, EPS, gathered=torch.empty(4, 16).half()),
        lambda h, i, c, w: bs.scatter_residual_add(h, torch.empty(4, 8), i, c),
        lambda h, i, c, w: bs.scatter_residual_add(h, h.clone(), i, c, float("nan")),
        lambda h, i, c, w: bs.scatter_residual_add(h, h.clone(), i, c, normed_out=h.clone()),
        lambda h, i, c, w: bs.scatter_residual_add(h, h.clone(), i, c, 1.0, w.half()),
    ],
)
def test_bad_arguments_raise_value_error(call):
    with pytest.raises(ValueError):
        call(*_valid_args())


# -------------------------------------------------------------------------------------------
# Launch planning
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, dim, ptrs, strides, vpt, expected",
    [
        (torch.bfloat16, 576, (256, 512), (576,), 4, ("bf16_v8", 32)),  # SmolLM2-135M
        (torch.bfloat16, 576, (256, 512), (576,), 2, ("bf16_v8", 64)),
        (torch.bfloat16, 2048, (256,), (2048,), 4, ("bf16_v8", 64)),
        (torch.float16, 4096, (256,), (4096,), 4, ("f16_v8", 128)),
        (torch.float32, 4096, (256,), (4096,), 1, ("f32_v4", 512)),
        (torch.float32, 8192, (256,), (8192,), 4, ("f32_v4", 512)),  # largest cached fp32 row
        (torch.float32, 16384, (256,), (16384,), 4, ("f32_v4_stream", 512)),
        (torch.bfloat16, 576, (258,), (576,), 4, ("bf16_v1_stream", 160)),  # unaligned pointer
        (torch.bfloat16, 576, (256,), (580,), 4, ("bf16_v1_stream", 160)),  # unaligned stride
        (torch.float16, 100, (256,), (100,), 4, ("f16_v1_stream", 32)),  # dim % 8 != 0
    ],
)
def test_plan_row_kernel(dtype, dim, ptrs, strides, vpt, expected):
    plan = bs.plan_row_kernel(dtype, dim, ptrs, strides, vpt)
    assert (plan.suffix, plan.threads) == expected
    assert plan.threads % 32 == 0 and plan.threads <= 512
    name = f"adadepth_gather_rmsnorm_{plan.suffix}"
    assert name in bs.KERNEL_NAMES
    if not plan.suffix.endswith("stream"):  # cached variant holds <= 4 vectors per thread
        assert dim // int(plan.suffix.split("_v")[1]) <= 4 * plan.threads


# -------------------------------------------------------------------------------------------
# Compilation of the CUDA source
# -------------------------------------------------------------------------------------------


def _cuda_python_importable() -> bool:
    for mod in ("cuda.core", "cuda.core.experimental", "cuda.bindings.nvrtc"):
        try:
            if importlib.util.find_spec(mod) is not None:
                return True
        except ImportError:
            continue
    return False


def _raise_import_error():
    raise ImportError("cuda.core hidden by the test")


@pytest.mark.skipif(not _cuda_python_importable(), reason="cuda-python (cuda-core/cuda-bindings) is not installed")
def test_nvrtc_compiles_for_sm80_and_sm90(tmp_path, monkeypatch):
    for arch in ("sm_80", "sm_90"):
        if arch == "sm_90":  # second arch: the raw-NVRTC fallback for a missing cuda.core
            if importlib.util.find_spec("cuda.bindings") is None:
                continue
            monkeypatch.setattr(nvrtc_build, "_cuda_core", _raise_import_error)
        cubin = bs.load_or_compile_cubin(arch, cache_dir=tmp_path)
        assert cubin[:4] == b"\x7fELF"
        for name in bs.KERNEL_NAMES:  # extern "C" names sit in the ELF symbol table
            assert name.encode() in cubin, f"{name} missing from the {arch} cubin"
    cached = sorted(tmp_path.glob("*.cubin"))
    assert len(cached) == 2 or importlib.util.find_spec("cuda.bindings") is None

    def no_compile(*args, **kwargs):
        raise AssertionError("cache miss: compiled again")

    monkeypatch.setattr(nvrtc_build, "compile_cubin", no_compile)
    assert bs.load_or_compile_cubin("sm_90", cache_dir=tmp_path) in {p.read_bytes() for p in cached}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_nvcc_compiles_for_sm80_and_sm90(tmp_path):
    """Second opinion from the toolkit's compiler (PTX only: keeps the test short)."""
    procs = [
        subprocess.Popen(
            ["nvcc", "-ptx", f"-arch=sm_{a}", "-std=c++17", "-Werror", "all-warnings",
             "-o", str(tmp_path / f"sm_{a}.ptx"), str(bs.SOURCE_PATH)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for a in ("80", "90")
    ]
    for p in procs:  # both run at once: the test takes one compile's time
        log, _ = p.communicate(timeout=120)
        assert p.returncode == 0, log
    for a in ("80", "90"):
        ptx = (tmp_path / f"sm_{a}.ptx").read_text()
        assert all(f".entry {n}(" in ptx for n in bs.KERNEL_NAMES)
