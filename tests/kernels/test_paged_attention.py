"""CPU paged decode attention: the C++ kernel against its PyTorch reference, the reference against
a per-row loop written from the definition, bad input, and the engine generating the same tokens
with the kernel as without it.

The kernel is built here with the machine's C++ compiler (~15 s, once per test session). Its
build failing is a test failure, not a skip: the engine would silently fall back otherwise.
"""
from __future__ import annotations

import math

import pytest
import torch

from adadepth import LLM, SamplingParams
from adadepth.kernels.paged_attention import load_cpu_paged_attention, paged_decode_attention_ref


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    op = load_cpu_paged_attention(str(tmp_path_factory.mktemp("extensions")))
    assert op is not None, "the C++ paged-attention kernel did not build (see the warning logged)"
    return op


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
    (lambda a: a.__setitem__(0, a[0].double()), "fp32 only"),
    (lambda a: a.__setitem__(0, torch.randn(2, 5, 16)), "multiple of num_kv_heads"),
])
def test_kernel_rejects_bad_input(kernel, mutate, message):
    args = list(random_case(2, 4, 2, 16, 4, 16))
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        kernel(*args)


def test_engine_generates_the_same_tokens_with_and_without_the_kernel(tiny_llama, cache_dir, kernel):
    kwargs = dict(dtype="float32", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
                  max_num_batched_tokens=512, block_size=4)
    prompts = ["hello world", "the quick brown fox jumps over", "what is 2 + 2?", "def add(a, b):"]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, depth=d, logprobs=0) for d in (6, 3, 5, 6)]
    fast = LLM(tiny_llama, **kwargs)
    plain = LLM(tiny_llama, cpu_paged_attention=False, **kwargs)
    assert all(layer.paged_attention is kernel for layer in fast.engine.model.layers)
    assert all(layer.paged_attention is paged_decode_attention_ref for layer in plain.engine.model.layers)
    for a, b in zip(fast.generate(prompts, params), plain.generate(prompts, params)):
        assert a.token_ids == b.token_ids
        lp_a = torch.tensor([next(iter(x.values())) for x in a.outputs[0].logprobs])
        lp_b = torch.tensor([next(iter(x.values())) for x in b.outputs[0].logprobs])
        torch.testing.assert_close(lp_a, lp_b, rtol=1e-4, atol=1e-4)


def test_loader_falls_back_to_none_when_the_build_fails(tmp_path, monkeypatch, caplog):
    from torch.utils import cpp_extension

    from adadepth.kernels import paged_attention

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: g++ not found")

    monkeypatch.setattr(paged_attention, "_registered_op", lambda: None)   # as in a fresh process
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert load_cpu_paged_attention(str(tmp_path)) is None
    assert "g++ not found" in caplog.text


def test_loader_falls_back_when_the_cache_folder_cannot_be_written(tmp_path, monkeypatch, caplog):
    from adadepth.kernels import paged_attention

    monkeypatch.setattr(paged_attention, "_registered_op", lambda: None)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the build folder would go")
    assert load_cpu_paged_attention(str(blocker)) is None
    assert "PyTorch path" in caplog.text
