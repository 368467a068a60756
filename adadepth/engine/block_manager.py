"""Paged KV-cache bookkeeping: fixed-size pages handed out to sequences, per group of layers.

A page (block) holds `block_size` token slots of every layer of one layer group (see
`KVLayout`); a sequence holds one block table per group its depth reaches, so a shallow request
holds fewer pages than a deep one. Slot s of the flat cache (num_blocks * block_size slots)
belongs to page s // block_size. Page 0 is a scratch page that padding tokens (and the groups a
row does not reach) write into; it is never handed out.
"""
from __future__ import annotations

from collections import deque

from adadepth.engine.sequence import Sequence
from adadepth.model.kv_layout import KVLayout


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, layout: KVLayout):
        if num_blocks < 2:
            raise ValueError("need at least one usable KV block besides the scratch block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layout = layout
        self.free_blocks: deque[int] = deque(range(1, num_blocks))

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_usable_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def groups_for_depth(self, depth: int) -> int:
        return self.layout.groups_for_depth(depth)

    def ensure_capacity(self, seq: Sequence, num_tokens: int, depth: int) -> bool:
        """Grow seq's block tables of the groups `depth` reaches to hold num_tokens; False (and
        no change) if pages ran out."""
        groups = self.groups_for_depth(depth)
        tables = seq.block_tables
        while len(tables) < groups:
            tables.append([])
        need = self.blocks_needed(num_tokens)
        missing = [max(0, need - len(tables[g])) for g in range(groups)]
        if sum(missing) > len(self.free_blocks):
            return False
        for g, count in enumerate(missing):
            for _ in range(count):
                tables[g].append(self.free_blocks.popleft())
        return True

    def trim(self, seq: Sequence, depth: int) -> None:
        """Give back the pages of groups beyond `depth` (a prompt reserved for full depth before
        the router picked a shallower one)."""
        groups = self.groups_for_depth(depth)
        for table in seq.block_tables[groups:]:
            self.free_blocks.extend(table)
        del seq.block_tables[groups:]

    def free(self, seq: Sequence) -> None:
        for table in seq.block_tables:
            self.free_blocks.extend(table)
        seq.block_tables = []
        seq.num_cached_tokens = 0
