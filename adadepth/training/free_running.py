"""Free-running quality: what a reader sees in depth-d's own text.

Teacher-forced agreement scores depth d on the full-depth model's text, so it cannot see a
reduced depth that drifts into loops once it feeds on its own tokens. Here each depth writes its
own greedy continuation (optionally with sampling penalties), which is then scored by

  * perplexity_full: exp(mean NLL) of that continuation under the same model at full depth
    (how plausible the full model finds it; low for fluent text, but also low for a loop the
    full model has seen a few times in context, hence the next two);
  * repeated_4gram_share: of the continuation's token 4-grams, the share that already occurred
    earlier in it (pooled over prompts; 0 for text that never repeats itself);
  * distinct_2: distinct token bigrams / bigrams (pooled over prompts; 1 for no repeats).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from adadepth.sampling_params import SamplingParams
from adadepth.training.depth_scorer import DepthScore, DepthScorer

# What a variant may set: the penalties that fight repetition.
VARIANT_FIELDS = ("repetition_penalty", "frequency_penalty", "presence_penalty")


@dataclass
class FreeRunningScore:
    nll_sum: float = 0.0
    tokens: int = 0
    repeated_4grams: int = 0
    total_4grams: int = 0
    distinct_2grams: int = 0
    total_2grams: int = 0
    num_prompts: int = 0

    def add_text(self, tokens: list[int]) -> None:
        fours = [tuple(tokens[i: i + 4]) for i in range(len(tokens) - 3)]
        seen: set[tuple] = set()
        for gram in fours:
            self.repeated_4grams += gram in seen
            seen.add(gram)
        self.total_4grams += len(fours)
        twos = [tuple(tokens[i: i + 2]) for i in range(len(tokens) - 1)]
        self.distinct_2grams += len(set(twos))
        self.total_2grams += len(twos)
        self.num_prompts += 1

    def summary(self, depth: int) -> dict:
        return {
            "depth": depth,
            "perplexity_full": round(math.exp(self.nll_sum / self.tokens), 4) if self.tokens else None,
            "repeated_4gram_share": round(self.repeated_4grams / self.total_4grams, 5) if self.total_4grams else None,
            "distinct_2": round(self.distinct_2grams / self.total_2grams, 5) if self.total_2grams else None,
            "mean_tokens": round(self.tokens / self.num_prompts, 2) if self.num_prompts else None,
            "num_prompts": self.num_prompts,
        }


def parse_variants(text: str) -> list[dict[str, float]]:
    """'repetition_penalty=1.1;frequency_penalty=0.5' -> [{}, {'repetition_penalty': 1.1}, ...]:
    plain greedy first, then one variant per ';'-separated group of comma-separated name=value."""
    variants: list[dict[str, float]] = [{}]
    for group in filter(None, (g.strip() for g in text.split(";"))):
        variant = {}
        for item in filter(None, (i.strip() for i in group.split(","))):
            name, sep, value = item.partition("=")
            if not sep or name.strip() not in VARIANT_FIELDS:
                raise ValueError(f"free-running variants are name=value with a name in {VARIANT_FIELDS}; got {item!r}")
            variant[name.strip()] = float(value)
        SamplingParams(**variant)  # range checks
        variants.append(variant)
    return variants


def generate_at_depths(llm, prompt_ids: dict[int, list[int]], depths: list[int], max_tokens: int,
                       variant: dict[str, float]) -> dict[int, dict[int, list[int]]]:
    """{depth: {prompt index: greedy continuation}} (stops at EOS like a served request)."""
    indices = list(prompt_ids)
    out = {}
    for depth in depths:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, depth=depth, **variant)
        outs = llm.generate([prompt_ids[i] for i in indices], params)
        out[depth] = {i: list(o.token_ids) for i, o in zip(indices, outs)}
    return out


def score_continuations(llm, prompt_ids: dict[int, list[int]], continuations: dict[int, dict[int, list[int]]],
                        batch_size: int) -> dict[int, FreeRunningScore]:
    """{depth: pooled scores} of every depth's continuations; perplexity by the full-depth model."""
    full = DepthScorer(llm, [llm.num_layers], batch_size)
    scores = {}
    for depth, by_prompt in continuations.items():
        nll = [{llm.num_layers: DepthScore()} for _ in range(max(prompt_ids) + 1)]
        full.reference_nll(nll, [(i, prompt_ids[i] + cont, len(prompt_ids[i])) for i, cont in by_prompt.items() if cont])
        score = FreeRunningScore()
        for i, cont in by_prompt.items():
            score.add_text(cont)
            score.nll_sum += nll[i][llm.num_layers].nll_sum
            score.tokens += nll[i][llm.num_layers].ref_tokens
        scores[depth] = score
    return scores
