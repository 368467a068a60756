"""One request's state as it moves through the engine."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from adadepth.outputs import DepthDecision
from adadepth.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


# eq=False: a sequence is an entity, compared by identity. The generated field-by-field __eq__
# made every `seq in running` build and compare tuples of all fields: O(batch^2) of them per step.
@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    depth: int | None = None                # decided at admission (explicit) or at prefill (router)
    depth_decision: DepthDecision | None = None
    depth_allowance: int | None = None      # --depth-policy load: the least depth the router may pick
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict[int, float]] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)  # per KV layer group: its pages
    num_cached_tokens: int = 0               # tokens whose KV is in the cache (every layer of its depth)
    block_hashes: list[bytes] = field(default_factory=list)  # prefix-cache hashes of its full computed blocks
    prefix_checked: bool = False             # looked up in the prefix cache since it last got pages
    # Chunked prefill of a prompt whose depth the router has yet to pick: its pooled features so
    # far (a `PrefillFeatureSum`), summed chunk by chunk over the router's feature layers.
    router_features: object | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    output_text: str = ""
    detok_offsets: tuple[int, int] = (0, 0)  # (prefix, read) offsets of incremental detokenization
    generator: torch.Generator | None = None  # per-request RNG when params.seed is set
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_preemptions: int = 0
    grammar: object | None = None            # an xgrammar GrammarMatcher when the output is constrained
    # How much of the output earlier RequestOutputs carried (each output holds only what is new).
    num_emitted_tokens: int = 0
    num_emitted_chars: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_feature_tokens(self) -> int:
        return 0 if self.router_features is None else self.router_features.num_tokens

    @property
    def is_prefilled(self) -> bool:
        """Every token but the newest has its KV cached: the next step is a decode step for it
        (the newest token's KV is written by the step that samples after it)."""
        return self.depth is not None and self.num_cached_tokens == self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED
