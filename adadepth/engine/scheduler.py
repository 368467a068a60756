"""Decides, each step, which sequences run: a prefill of newcomers or a decode of the running.

Continuous batching: requests join (prefill) and leave (finish/abort) between steps. When the
KV cache runs out mid-decode the newest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue to be recomputed later - it waits, it is never dropped.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from adadepth.config import SchedulerConfig
from adadepth.engine.block_manager import BlockManager
from adadepth.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    seqs: list[Sequence]
    is_prefill: bool


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager):
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # total, for metrics and tests

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        prefill = self._schedule_prefill()
        if prefill:
            return SchedulerOutput(prefill, is_prefill=True)
        decode = self._schedule_decode()
        return SchedulerOutput(decode, is_prefill=False) if decode else None

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.running) + len(scheduled) < self.config.max_num_seqs:
            seq = self.waiting[0]
            longest_if_added = max(longest, seq.num_tokens)
            # Prefill rows are padded to the longest prompt: budget the padded token count.
            if scheduled and longest_if_added * (len(scheduled) + 1) > self.config.max_num_batched_tokens:
                break
            if not self.block_manager.ensure_capacity(seq, seq.num_tokens):
                break
            self.waiting.popleft()
            longest = longest_if_added
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            scheduled.append(seq)
        self.running.extend(scheduled)
        return scheduled

    def _schedule_decode(self) -> list[Sequence]:
        scheduled: list[Sequence] = []
        for seq in list(self.running):
            if seq.status != SequenceStatus.RUNNING:  # preempted below to make room
                continue
            while not self.block_manager.ensure_capacity(seq, seq.num_tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                scheduled.append(seq)
        return scheduled

    def preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
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
