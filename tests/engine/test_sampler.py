"""The sampler's logits processing against transformers' logits processors on the same logits."""
from __future__ import annotations

import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from adadepth.engine.sampler import Sampler
from adadepth.engine.sequence import Sequence
from adadepth.sampling_params import SamplingParams

VOCAB = 64


def make_seq(i: int, prompt: list[int], output: list[int], **params) -> Sequence:
    seq = Sequence(f"r{i}", None, prompt, SamplingParams(max_tokens=64, **params))
    seq.output_token_ids = list(output)
    return seq


def random_batch(seed: int) -> tuple[torch.Tensor, list[Sequence]]:
    """Rows with every combination of settings, including rows that set none."""
    g = torch.Generator().manual_seed(seed)
    settings = [
        {},
        {"repetition_penalty": 1.3},
        {"repetition_penalty": 0.7, "frequency_penalty": 0.4},
        {"presence_penalty": -0.5, "frequency_penalty": 1.1},
        {"logit_bias": {3: 5.0, 7: -100.0, 11: 2.5}},
        {"logit_bias": {5: -3.0}, "repetition_penalty": 1.8, "presence_penalty": 0.9, "frequency_penalty": -0.2},
        {"temperature": 0.7, "min_p": 0.1},
        {"temperature": 1.3, "min_p": 0.05, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.2},
        {"temperature": 0.9, "top_p": 0.5},
    ]
    seqs = []
    for i, kw in enumerate(settings):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
        output = torch.randint(0, VOCAB, (int(torch.randint(0, 20, (1,), generator=g)),), generator=g).tolist()
        seqs.append(make_seq(i, prompt, output, **kw))
    logits = torch.randn(len(seqs), VOCAB, generator=g, dtype=torch.float64) * 3
    return logits, seqs


def reference_processed(row: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One row through transformers' processors (bias, repetition) and OpenAI's penalty formula."""
    p = seq.params
    scores = row[None].clone()                                                   # (1, V)
    ids = torch.tensor([seq.prompt_token_ids + seq.output_token_ids])
    if p.logit_bias:
        scores = SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias.items()})(ids, scores)
    if p.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    for token in set(seq.output_token_ids):  # OpenAI: mu[j] -= c[j] * alpha_frequency + (c[j] > 0) * alpha_presence
        count = seq.output_token_ids.count(token)
        scores[0, token] -= count * p.frequency_penalty + p.presence_penalty
    return scores[0]


def reference_sampling_logits(processed: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """transformers' warpers in vLLM's order: temperature, min-p, top-k, top-p."""
    p = seq.params
    scores = processed[None].clone()
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.min_p:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processing_equals_transformers_processors(seed):
    logits, seqs = random_batch(seed)
    processed = logits.clone()
    Sampler(set()).process(processed, seqs)
    for i, seq in enumerate(seqs):
        torch.testing.assert_close(processed[i], reference_processed(logits[i], seq), rtol=0, atol=1e-12)
    sampled_rows = [i for i, s in enumerate(seqs) if not s.params.greedy]
    final = Sampler.sampling_logits(processed[sampled_rows], [seqs[i] for i in sampled_rows])
    for row, i in enumerate(sampled_rows):
        expected = reference_sampling_logits(processed[i], seqs[i])
        assert torch.equal(torch.isinf(final[row]), torch.isinf(expected)), f"row {i}: different tokens kept"
        kept = torch.isfinite(expected)
        torch.testing.assert_close(final[row][kept], expected[kept], rtol=0, atol=1e-12)


def test_rows_without_settings_are_untouched_and_rows_do_not_leak():
    logits, seqs = random_batch(3)
    processed = logits.clone()
    Sampler(set()).process(processed, seqs)
    assert torch.equal(processed[0], logits[0])
    # Each row alone gives what it gets in the batch: settings are per row.
    for i, seq in enumerate(seqs):
        alone = logits[i: i + 1].clone()
        Sampler(set()).process(alone, [seq])
        assert torch.equal(alone[0], processed[i])


def test_top_k_beyond_the_vocabulary_keeps_every_token():
    """A k larger than the vocabulary (even past 64 bits) is no cut at all, as top_k = -1: it must
    not fail the step that samples it."""
    assert SamplingParams(max_tokens=1, top_k=10**20).top_k == -1
    logits, _ = random_batch(5)
    rows = [make_seq(0, [1], [], temperature=1.0, top_k=VOCAB + 1), make_seq(1, [1], [], temperature=1.0, top_k=-1),
            make_seq(2, [1], [], temperature=1.0, top_k=2**31 - 1)]
    final = Sampler.sampling_logits(logits[:3].clone(), rows)
    assert torch.isfinite(final).all()
    cut = Sampler.sampling_logits(logits[:1].clone(), [make_seq(0, [1], [], temperature=1.0, top_k=3)])
    assert int(torch.isfinite(cut).sum()) == 3


def test_a_vanishing_temperature_is_greedy():
    """1e-300 is 0 in float32: dividing by it would sample from infinities; below 1e-5 rows are greedy."""
    logits, _ = random_batch(7)
    for temperature in (1e-300, 5e-324, 1e-6):
        rows = [make_seq(i, [1], [], temperature=temperature, seed=i) for i in range(len(logits))]
        assert Sampler(set())(logits.clone(), rows).token_ids == logits.argmax(dim=-1).tolist()


def test_greedy_token_follows_processed_logits():
    logits = torch.zeros(2, VOCAB, dtype=torch.float64)
    logits[:, 9] = 4.0
    seqs = [make_seq(0, [1], [9, 9], temperature=0.0, frequency_penalty=2.0),   # 4 - 2 * 2 = 0 < bias
            make_seq(1, [1], [], temperature=0.0, logit_bias={20: 100.0})]
    seqs[0].params.logit_bias = {30: 1.0}
    out = Sampler(set())(logits, seqs)
    assert out.token_ids == [30, 20]


def test_sampled_tokens_stay_inside_min_p():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, VOCAB, generator=g) * 2
    allowed = torch.softmax(logits[0], -1) >= 0.3 * torch.softmax(logits[0], -1).max()
    seen = set()
    for seed in range(200):
        seq = make_seq(0, [1], [], temperature=1.0, min_p=0.3, seed=seed)
        seq.generator = torch.Generator().manual_seed(seed)
        seen.add(Sampler(set())(logits.clone(), [seq]).token_ids[0])
    assert seen <= set(torch.nonzero(allowed).flatten().tolist())
    assert len(seen) == int(allowed.sum()), "every token above the threshold is drawn in 200 tries"


def test_sampled_frequencies_follow_the_distribution_and_seeded_rows_ignore_neighbours():
    """Many rows of one distribution in one call: each token's share is its probability (within 5
    standard errors), a token of probability 0 is never drawn, and a seeded row draws the same
    token whatever rows share its batch."""
    probs = torch.tensor([0.5, 0.25, 0.125, 0.0, 0.0625, 0.0625] + [0.0] * (VOCAB - 6), dtype=torch.float64)
    logits = probs.log().expand(4000, VOCAB).clone()                                # (B, V), -inf where 0
    seqs = [make_seq(i, [1], [], temperature=1.0) for i in range(4000)]
    tokens = torch.tensor(Sampler(set())(logits, seqs).token_ids)
    counts = torch.bincount(tokens, minlength=VOCAB).double()
    assert counts[probs == 0].sum() == 0
    stderr = (4000 * probs * (1 - probs)).sqrt()
    assert bool(((counts - 4000 * probs).abs() <= 5 * stderr + 1e-9).all()), counts[:6].tolist()

    def seeded(neighbours: int) -> int:
        seq = make_seq(0, [1], [], temperature=1.0, seed=7)
        seq.generator = torch.Generator().manual_seed(7)
        batch = [seq] + [make_seq(i + 1, [1], [], temperature=1.0) for i in range(neighbours)]
        return Sampler(set())(logits[: len(batch)].clone(), batch).token_ids[0]
    assert len({seeded(n) for n in (0, 3, 17)}) == 1


@pytest.mark.parametrize("kw, message", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"logit_bias": {1: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}}, "logit_bias"),
])
def test_out_of_range_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kw)


def test_engine_greedy_equals_transformers_generate_with_penalties(tiny_llama, cache_dir):
    """Token for token, the engine with repetition penalty, logit bias and min-p (greedy) against
    transformers' generate with the same processors, on the same tiny model in float64."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adadepth import LLM

    llm = LLM(tiny_llama, dtype="float64", cache_dir=cache_dir, num_kv_tokens=2048, max_model_len=256,
              max_num_batched_tokens=512)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    prompts = ["hello world", "the quick brown fox jumps", "def add(a, b):"]
    bias = {5: 3.0, 17: -100.0}
    cases = [dict(repetition_penalty=1.5), dict(repetition_penalty=0.8, logit_bias=bias), dict(logit_bias=bias)]
    for case in cases:
        params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, **case)
        ours = [list(o.token_ids) for o in llm.generate(prompts, params)]
        for prompt, got in zip(prompts, ours):
            ids = tok(prompt, return_tensors="pt").input_ids
            hf = model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                repetition_penalty=case.get("repetition_penalty"),
                                sequence_bias={(t,): b for t, b in case.get("logit_bias", {}).items()} or None)
            assert got == hf[0, ids.shape[1]:].tolist(), case
    # The penalty did something: the unpenalised greedy text differs for some prompt.
    plain = [list(o.token_ids) for o in llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0,
                                                                               ignore_eos=True))]
    penalised = [list(o.token_ids) for o in llm.generate(prompts, SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, repetition_penalty=1.5))]
    assert plain != penalised
