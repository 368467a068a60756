"""Where each layer's keys and values live: a KV cache paged by groups of layers.

Layers are grouped by their rank in the layer order: group g holds the layers of ranks
g*s .. g*s + s - 1 (s = `group_layers`). A depth-d request runs the layers of ranks < d, so it
needs groups 0 .. ceil(d/s) - 1 only, and holds pages in those alone: at a fixed cache size,
shallower requests leave room for more of them (vLLM's hybrid KV manager keeps groups of layers
apart in the same way).

The cache is one tensor (s, 2, num_pages * block_size, Hkv, Dh): a page (block) holds
`block_size` tokens of all s layers of the group that owns it, layer of rank r at position
r % s. So every layer sees a contiguous (slots, Hkv, Dh) view, as the kernels expect, and reads
its group's block table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVLayout:
    group_layers: int            # s: layers per group
    group: tuple[int, ...]       # per layer (natural order): its group
    position: tuple[int, ...]    # per layer: its index within a page
    num_groups: int

    @classmethod
    def for_ranks(cls, rank: list[int], group_layers: int) -> "KVLayout":
        if group_layers < 1:
            raise ValueError("group_layers must be >= 1")
        s = min(group_layers, len(rank))
        return cls(s, tuple(r // s for r in rank), tuple(r % s for r in rank), -(-len(rank) // s))

    def groups_for_depth(self, depth: int) -> int:
        """Groups a depth-`depth` request writes to (ranks 0 .. depth - 1)."""
        return -(-depth // self.group_layers)
