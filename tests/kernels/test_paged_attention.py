"""CPU paged decode attention: the C++ kernel against its PyTorch reference (float32 and bfloat16),
the reference against a per-row loop written from the definition, bad input, and the engine
generating the same tokens with the CPU kernels as without them.

The kernels are built here with the machine's C++ compiler (once per test run). A
failed build is a test failure, not a skip: the engine would silently fall back otherwise.
"""
from __future__ import annotations

import math

import pytest
import torch

from adadepth import LLM, SamplingParams
from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.kernels.paged_attention import chunk_attention, paged_decode_attention_ref
from output_helpers import chosen_logprobs


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    ops = load_cpu_ops(str(tmp_path_factory.mktemp("extensions")))
    assert ops is not None, "the C++ CPU kernels did not build (see the warning logged)"
    return ops.paged_attention


def random_case(n: int, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                max_len: int, seed: int = 0):
    """A cache whose blocks are handed out in shuffled order, rows of different lengths, and
    garbage in every slot a row must not read (its blocks' tail, the padding block entries)."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-max_len // block_size)
    num_blocks = n * nblk + 3
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g) * 3
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g)
    lens = torch.randint(1, max_len + 1, (n,), generator=g)
    lens[0] = max_len
    table = torch.randperm(num_blocks, generator=g)[: n * nblk].view(n, nblk).clone()   # (n, nblk)
    for i in range(n):  # unused table entries point at block 0, like the model runner's padding
        table[i, -(-int(lens[i]) // block_size):] = 0
    q = torch.randn(n, num_heads, head_dim, generator=g)
    return q, k_cache, v_cache, table, lens, 1.0 / math.sqrt(head_dim)


def loop_oracle(q, k_cache, v_cache, table, lens, scale):
    """Row by row, head by head, from the definition."""
    n, num_heads, head_dim = q.shape
    bs, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    for i in range(n):
        pos = torch.arange(int(lens[i]))
        blocks = table[i, pos // bs]
        for h in range(num_heads):
            keys = k_cache[blocks, pos % bs, h // group].double()               # (len, Dh)
            values = v_cache[blocks, pos % bs, h // group].double()
            weights = torch.softmax(keys @ q[i, h].double() * scale, dim=0)     # (len,)
            out[i, h] = (weights @ values).float()
    return out


CASES = [  # n, H, Hkv, Dh, block_size, max_len
    (1, 4, 4, 16, 16, 1),        # a single token of context
    (3, 4, 2, 16, 4, 37),        # GQA, partial last block
    (16, 9, 3, 64, 16, 224),     # SmolLM2-135M's heads at batch 16
    (5, 8, 1, 32, 1, 20),        # multi-query, one token per block
    (2, 6, 6, 128, 8, 130),      # plain multi-head, wide heads
    (4, 16, 2, 128, 16, 51),     # eight query heads per kv head, wide heads
    (3, 12, 1, 64, 16, 40),      # twelve query heads per kv head (the portable loop's case)
]


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_loop_oracle(case):
    args = random_case(*case)
    torch.testing.assert_close(paged_decode_attention_ref(*args), loop_oracle(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_reference(kernel, case):
    args = random_case(*case, seed=1)
    got = kernel(*args)
    assert got.shape == args[0].shape and got.dtype == torch.float32
    torch.testing.assert_close(got, paged_decode_attention_ref(*args), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_bf16_kernel_matches_the_reference_on_the_same_bf16_values(kernel, case):
    """bf16 cache and queries, float32 math: the reference is run in float32 on the very values
    the kernel reads, so the only difference left is the output's rounding to bf16."""
    q, k_cache, v_cache, table, lens, scale = random_case(*case, seed=2)
    q, k_cache, v_cache = (t.bfloat16() for t in (q, k_cache, v_cache))
    got = kernel(q, k_cache, v_cache, table, lens, scale)
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    want = paged_decode_attention_ref(q.float(), k_cache.float(), v_cache.float(), table, lens, scale)
    torch.testing.assert_close(got.float(), want, rtol=1 / 128, atol=1e-3)


def test_kernel_reads_strided_queries(kernel):
    q, *rest = random_case(4, 4, 2, 16, 4, 30)
    wide = torch.randn(4, 4, 32)
    wide[..., ::2] = q
    strided = wide[..., ::2]                                                    # not contiguous
    torch.testing.assert_close(kernel(strided, *rest), paged_decode_attention_ref(q, *rest), rtol=1e-5, atol=1e-5)


def test_kernel_rows_do_not_depend_on_their_batch(kernel):
    """Batch invariance at the kernel level: a row's result is bit-identical alone or in a batch."""
    q, k_cache, v_cache, table, lens, scale = random_case(6, 9, 3, 64, 16, 100)
    batch = kernel(q, k_cache, v_cache, table, lens, scale)
    for i in range(6):
        alone = kernel(q[i:i + 1], k_cache, v_cache, table[i:i + 1], lens[i:i + 1], scale)
        assert torch.equal(alone[0], batch[i])


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.__setitem__(4, torch.tensor([0, 99])), "context_lens"),                 # longer than its blocks
    (lambda a: a.__setitem__(4, torch.tensor([0, 5])), "context_lens"),                  # empty context
    (lambda a: a.__setitem__(3, torch.full_like(a[3], 10_000)), "block_table entry out of range"),
    (lambda a: a.__setitem__(0, a[0].double()), "float32 or bfloat16"),
    (lambda a: a.__setitem__(1, a[1].bfloat16()), "float32 or bfloat16"),              # q and cache differ
    (lambda a: a.__setitem__(0, torch.randn(2, 5, 16)), "multiple of num_kv_heads"),
])
def test_kernel_rejects_bad_input(kernel, mutate, message):
    args = list(random_case(2, 4, 2, 16, 4, 16))
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        kernel(*args)


def test_engine_generates_the_same_tokens_with_and_without_the_kernels(tiny_llama, cache_dir, kernel):
    kwargs = dict(dtype="float32", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
                  max_num_batched_tokens=512, block_size=4)
    prompts = ["hello world", "the quick brown fox jumps over", "what is 2 + 2?", "def add(a, b):"]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, depth=d, logprobs=0) for d in (6, 3, 5, 6)]
    fast = LLM(tiny_llama, **kwargs)
    plain = LLM(tiny_llama, cpu_kernels=False, **kwargs)
    assert all(layer.ops.paged_attention is kernel for layer in fast.engine.model.layers)
    assert all(layer.ops.paged_attention is paged_decode_attention_ref for layer in plain.engine.model.layers)
    for a, b in zip(fast.generate(prompts, params), plain.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        lp_a = torch.tensor(chosen_logprobs(a))
        lp_b = torch.tensor(chosen_logprobs(b))
        torch.testing.assert_close(lp_a, lp_b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_attention_equals_one_decode_row_per_token(case, dtype):
    """A prompt chunk of c tokens at positions p..p+c-1 = c decode rows of one sequence whose
    contexts end at their own positions."""
    _, num_heads, num_kv_heads, head_dim, block_size, max_len = case
    q, k_cache, v_cache, table, _, scale = random_case(1, num_heads, num_kv_heads, head_dim, block_size, max_len + 7)
    q_all = torch.randn(max_len + 7, num_heads, head_dim, generator=torch.Generator().manual_seed(3))
    k_cache, v_cache = k_cache.to(dtype), v_cache.to(dtype)
    for first, count in [(0, max_len), (max_len // 2, max_len - max_len // 2 + 7), (max_len, 1)]:
        qc = q_all[first: first + count].to(dtype)
        rows = table[0].expand(count, -1)
        lens = torch.arange(first + 1, first + count + 1)
        want = paged_decode_attention_ref(qc, k_cache, v_cache, rows, lens, scale)
        got = chunk_attention(qc, k_cache, v_cache, table[0], first, scale)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
