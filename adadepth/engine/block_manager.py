"""Paged KV-cache bookkeeping: fixed-size blocks handed out to sequences.

A block holds `block_size` token slots in every layer's cache. Slot s of the flat cache
(num_blocks * block_size slots) belongs to block s // block_size. Block 0 is a scratch block
that padding tokens write into; it is never allocated to a sequence.
"""
from __future__ import annotations

from collections import deque

from adadepth.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError("need at least one usable KV block besides the scratch block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free_blocks: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_needed(num_tokens) <= len(self.free_blocks)

    def ensure_capacity(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq's block_table to hold num_tokens; False (and no change) if blocks ran out."""
        missing = self.blocks_needed(num_tokens) - len(seq.block_table)
        if missing > len(self.free_blocks):
            return False
        for _ in range(max(0, missing)):
            seq.block_table.append(self.free_blocks.popleft())
        return True

    def free(self, seq: Sequence) -> None:
        self.free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
