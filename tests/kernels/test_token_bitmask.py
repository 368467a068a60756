"""The grammar-mask kernel against its PyTorch reference and against xgrammar's own CPU path."""
from __future__ import annotations

import pytest
import torch

from adadepth.kernels.cpu_ops import load_cpu_ops
from adadepth.kernels.token_bitmask import apply_token_bitmask_ref, token_bitmask_op


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built = load_cpu_ops(str(tmp_path_factory.mktemp("extensions")))
    assert built is not None, "the CPU kernels must build on the test machine"
    op = token_bitmask_op()
    assert op is not apply_token_bitmask_ref
    return op


@pytest.mark.parametrize("vocab", [70, 96, 49152])
def test_kernel_equals_reference_and_xgrammar(kernel, vocab):
    import xgrammar

    g = torch.Generator().manual_seed(vocab)
    b, words = 6, -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (b, words), generator=g, dtype=torch.int64).to(torch.int32)
    bitmask[1] = -1                    # a row that allows everything
    bitmask[2] = 0                     # one that allows nothing
    bitmask[3, ::2] = -1               # whole words allowed next to mixed ones
    logits = torch.randn(b, vocab, generator=g)
    rows = [0, 1, 2, 3, 5]             # row 4 is free: untouched
    ours, ref, theirs = logits.clone(), logits.clone(), logits.clone()
    kernel(ours, bitmask, torch.tensor(rows))
    apply_token_bitmask_ref(ref, bitmask, torch.tensor(rows))
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab, indices=rows)
    assert torch.equal(ours, ref) and torch.equal(ours, theirs)
    assert torch.equal(ours[4], logits[4]) and torch.equal(ours[1], logits[1]) and torch.isinf(ours[2]).all()
    # Bit b of word w allows token 32 w + b.
    allowed = torch.isfinite(ours[0])
    expected = [(int(bitmask[0, t // 32]) >> (t % 32)) & 1 for t in range(vocab)]
    assert allowed.tolist() == [bool(e) for e in expected]
