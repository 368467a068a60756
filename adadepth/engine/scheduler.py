"""Decides, each step, which sequences run: a prefill of newcomers, a decode of the running, or
a decode that also carries pieces of new prompts (chunked prefill).

Continuous batching: requests join (prefill) and leave (finish/abort) between steps. When the
server is idle, prompts run whole in a prefill step of their own (the fastest way to a first
token). While sequences decode, new prompts instead ride along the decode steps, up to
`prefill_chunk_tokens` prompt tokens per step; a longer prompt goes in pieces. When more
sequences wait for their prefill than decode, the budget grows in proportion (`_chunk_budget`).

Why a large default budget (2048): served with short chat prompts, small chunks (64) spread
each newcomer over several steps, every one of them slowing all running streams, and admitted a
wave of newcomers more slowly than the finished requests left, so steps ran with rows to spare.
Taking whole prompts at once gave more throughput and a lower p99 inter-token latency (fewer slow
gaps, each longer). A small budget still bounds what a long prompt costs the streams per step
(docs/benchmarks.md, chunked prefill).

A prompt whose depth the router has yet to pick first runs chunk by chunk through the router's
feature layers only (k of L layers, pooled as it goes); once its last chunk is in, the router
decides and the prompt is prefilled again, at its depth, from position 0 (k/L extra work for the
layers 0..k-1 that run twice; nothing has to be kept between the two passes).

A prompt whose leading full blocks were computed before at its depth (a shared system prompt,
an earlier turn of the chat, the same prompt again) takes those pages from the prefix cache
(`BlockManager.take_cached_prefix`) and runs the rest as chunks, from the first token not cached.

When the KV cache runs out, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later - it waits, it is never dropped.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from adadepth.config import SchedulerConfig
from adadepth.engine.block_manager import BlockManager
from adadepth.engine.sequence import Sequence, SequenceStatus


@dataclass
class PrefillChunk:
    """Positions [start, start + num_tokens) of a sequence's prompt, run in a decode step."""
    seq: Sequence
    start: int
    num_tokens: int
    features_only: bool  # depth not picked yet: only the router's feature layers run


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]  # a prefill's sequences (whole prompts), or the sequences decoding
    is_prefill: bool
    chunks: list[PrefillChunk] = field(default_factory=list)  # prompt pieces riding along a decode


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, num_layers: int,
                 feature_cost: float = 1.0, feature_depth: int | None = None):
        """feature_cost: what a token run through the router's feature layers only costs, as a
        fraction of a full token (k / L), for the chunk budget; feature_depth: the depth whose
        layers include the router's feature layers (the KV pages such a chunk writes to)."""
        self.config = config
        self.num_layers = num_layers
        self.feature_cost = feature_cost
        self.feature_depth = feature_depth or num_layers
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total, for metrics and tests

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        # A prompt with a computed prefix in the cache starts past position 0: in a chunk.
        while self.config.prefill_chunk_tokens and (self.running or self._head_has_cached_prefix()):
            decode = self._schedule_decode()
            chunks = self._schedule_chunks(self._chunk_budget(len(decode)))
            if decode or chunks:
                return SchedulerOutput(decode, is_prefill=False, chunks=chunks)
            if not self.running:
                break
            self.preempt(self.running[-1])  # only prompts under way, and no block left for any: the newest waits
        prefill = self._schedule_prefill()
        if prefill:
            return SchedulerOutput(prefill, is_prefill=True)
        decode = self._schedule_decode()
        return SchedulerOutput(decode, is_prefill=False) if decode else None

    def _chunk_budget(self, num_decoding: int) -> int:
        """Prompt tokens this decode step may carry: `prefill_chunk_tokens` per step, times the
        number of sequences waiting for their prefill per sequence decoding (at least 1x, at most
        `max_num_batched_tokens`).

        Why: prompts then get a share of each step in proportion to how many sequences wait for
        them. With a small budget, a few arrivals among many streams ride along in small chunks
        (the streams keep their pace), while a burst of arrivals next to a few streams (a wave of
        requests replacing the ones that just finished) is still prefilled in a step or two: 64
        tokens at a time had held 15 new prompts back for ~25 steps behind one decoding stream."""
        num_prefilling = len(self.waiting) + sum(1 for s in self.running if not s.is_prefilled)
        scale = max(1.0, num_prefilling / max(1, num_decoding))
        return min(self.config.max_num_batched_tokens, int(self.config.prefill_chunk_tokens * scale))

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs:  # admitted ones count
            seq = self.waiting[0]
            if self._take_cached_prefix(seq):
                break  # it starts past position 0, which only the chunk path does (next step)
            # A prefill runs packed (no padding): budget its real tokens.
            if scheduled and num_tokens + seq.num_tokens > self.config.max_num_batched_tokens:
                break
            # A depth still to be routed reserves full depth; the pages past it go back after.
            if not self.block_manager.ensure_capacity(seq, seq.num_tokens, seq.depth or self.num_layers):
                break
            num_tokens += seq.num_tokens
            scheduled.append(self._admit())
        return scheduled

    def _take_cached_prefix(self, seq: Sequence) -> bool:
        """Whether seq starts with a computed prefix from the prefix cache (looked up once, when it
        has no pages yet and its depth is known; the engine enables the cache with chunked prefill only)."""
        self.block_manager.take_cached_prefix(seq)
        return seq.num_cached_tokens > 0

    def _head_has_cached_prefix(self) -> bool:
        return (bool(self.waiting) and len(self.running) < self.config.max_num_seqs
                and self._take_cached_prefix(self.waiting[0]))

    def _admit(self) -> Sequence:
        """The queue's first sequence, now running."""
        seq = self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        if seq.first_scheduled_time is None:
            seq.first_scheduled_time = time.monotonic()
        self.running.append(seq)
        return seq

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING or not seq.is_prefilled:  # preempted below / mid-prompt
                continue
            if self._make_room(seq, seq.num_tokens):
                scheduled.append(seq)
        return scheduled

    def _make_room(self, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for num_tokens of seq, preempting the newest running sequences as needed;
        False if seq itself had to go."""
        while not self.block_manager.ensure_capacity(seq, num_tokens, seq.depth):
            victim = self.running[-1]
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def _schedule_chunks(self, budget: int) -> list[PrefillChunk]:
        """Pieces of prompts for a decode step, at most `budget` token-equivalents in all: first
        the prompts already under way (oldest first), then newcomers from the queue."""
        chunks: list[PrefillChunk] = []
        left = float(budget)
        for seq in list(self.running):
            if left < 1:
                return chunks
            if seq.status != SequenceStatus.RUNNING or seq.is_prefilled:
                continue
            chunk = self._next_chunk(seq, left)
            # No preemption for a chunk: the victims could be sequences this step decodes.
            if self.block_manager.ensure_capacity(seq, chunk.start + chunk.num_tokens, self._kv_depth(chunk)):
                chunks.append(chunk)
                left -= self._cost(chunk)
        while self.waiting and left >= 1 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            self._take_cached_prefix(seq)
            chunk = self._next_chunk(seq, left)
            if not self.block_manager.ensure_capacity(seq, chunk.start + chunk.num_tokens, self._kv_depth(chunk)):
                break
            self._admit()
            chunks.append(chunk)
            left -= self._cost(chunk)
        return chunks

    def _next_chunk(self, seq: Sequence, budget: float) -> PrefillChunk:
        if seq.depth is None:  # the router's pass: its feature layers only, so tokens are cheap
            start = seq.num_feature_tokens
            count = min(seq.num_tokens - start, max(1, int(budget / self.feature_cost)))
            return PrefillChunk(seq, start, count, features_only=True)
        start = seq.num_cached_tokens
        return PrefillChunk(seq, start, min(seq.num_tokens - start, int(budget)), features_only=False)

    def _kv_depth(self, chunk: PrefillChunk) -> int:
        return self.feature_depth if chunk.features_only else chunk.seq.depth

    def _cost(self, chunk: PrefillChunk) -> float:
        return chunk.num_tokens * (self.feature_cost if chunk.features_only else 1.0)

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.router_features = None  # a router pass under way starts over (a picked depth stays)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
