"""Paged KV-cache bookkeeping: fixed-size pages handed out to sequences, per group of layers, and
the prefix cache that lets sequences share the pages of a prompt prefix already computed.

A page (block) holds `block_size` token slots of every layer of one layer group (see
`KVLayout`); a sequence holds one block table per group its depth reaches, so a shallow request
holds fewer pages than a deep one. Slot s of the flat cache (num_blocks * block_size slots)
belongs to page s // block_size. Page 0 is a scratch page that padding tokens (and the groups a
row does not reach) write into; it is never handed out.

Prefix caching (as vLLM's automatic prefix caching): a full block of a sequence whose keys and
values are computed gets a hash of (the hash of the block before it, its tokens); the block's pages
(one per group) are registered under it. A new sequence walks its prompt's full blocks, hash by
hash, and takes the registered pages it finds instead of computing them again. The chain starts
from the sequence's depth: a layer's keys and values depend on which layers ran before it, so
pages computed at one depth serve only requests of that depth. Pages are counted by reference;
registered pages nobody holds stay cached (and count as free) until a page is needed and the least
recently released ones are evicted. A sequence never writes into a registered page: only full
blocks are registered, and a hit stops short of the prompt's last token, which the sequence
computes itself to get its first logits.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from adadepth.engine.sequence import Sequence
from adadepth.model.kv_layout import KVLayout


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, layout: KVLayout, enable_prefix_caching: bool = False):
        if num_blocks < 2:
            raise ValueError("need at least one usable KV block besides the scratch block")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layout = layout
        self.enable_prefix_caching = enable_prefix_caching
        self.free_blocks: deque[int] = deque(range(1, num_blocks))
        self.ref_count = [0] * num_blocks
        self.cached: dict[bytes, tuple[int, ...]] = {}      # block hash -> its pages, one per group
        self.page_hash: dict[int, bytes] = {}               # registered page -> its block's hash
        # Registered blocks no sequence holds, least recently released first: free, but kept
        # (and found by hash) until their pages are needed.
        self.evictable: OrderedDict[bytes, tuple[int, ...]] = OrderedDict()
        self._num_evictable_pages = 0
        self.num_queried_tokens = 0   # prompt tokens looked up in the prefix cache
        self.num_hit_tokens = 0       # of those, found computed

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + self._num_evictable_pages

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

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
        if sum(missing) > self.num_free_blocks:
            return False
        for g, count in enumerate(missing):
            for _ in range(count):
                page = self._take_page()
                self.ref_count[page] = 1
                tables[g].append(page)
        return True

    def trim(self, seq: Sequence, depth: int) -> None:
        """Give back the pages of groups beyond `depth` (a prompt reserved for full depth before
        the router picked a shallower one)."""
        groups = self.groups_for_depth(depth)
        for table in seq.block_tables[groups:]:
            for page in table:
                self._release(page)
        del seq.block_tables[groups:]

    def free(self, seq: Sequence) -> None:
        for table in seq.block_tables:
            for page in table:
                self._release(page)
        seq.block_tables = []
        seq.block_hashes = []
        seq.prefix_checked = False
        seq.num_cached_tokens = 0

    # ---- prefix caching --------------------------------------------------------------------
    @staticmethod
    def _chain_start(depth: int) -> bytes:
        return hashlib.blake2b(f"adadepth-kv depth {depth}".encode(), digest_size=16).digest()

    def _block_hash(self, parent: bytes, seq: Sequence, index: int) -> bytes:
        """128-bit hash of (parent block's hash, this block's token ids): a collision, which would
        hand a request another prefix's keys and values, is out of reach."""
        bs = self.block_size
        tokens = array("q", seq.token_ids[index * bs: (index + 1) * bs])
        return hashlib.blake2b(parent + tokens.tobytes(), digest_size=16).digest()

    def take_cached_prefix(self, seq: Sequence) -> int:
        """For a sequence about to start its prompt at its depth (no pages yet): take the
        registered pages of its prompt's longest computed prefix of full blocks, short of the last
        token, and mark those tokens computed. Returns the number of such tokens (0: none)."""
        if (not self.enable_prefix_caching or seq.depth is None or seq.prefix_checked or seq.block_tables
                or seq.num_cached_tokens):
            return 0
        seq.prefix_checked = True
        groups = self.groups_for_depth(seq.depth)
        full = (seq.num_tokens - 1) // self.block_size
        h = self._chain_start(seq.depth)
        found: list[tuple[bytes, tuple[int, ...]]] = []
        for index in range(full):
            h = self._block_hash(h, seq, index)
            pages = self.cached.get(h)
            if pages is None:
                break
            found.append((h, pages))
        self.num_queried_tokens += seq.num_tokens
        if not found:
            return 0
        seq.block_tables = [[] for _ in range(groups)]
        for h, pages in found:
            if h in self.evictable:
                del self.evictable[h]
                self._num_evictable_pages -= len(pages)
            for g, page in enumerate(pages):
                self.ref_count[page] += 1
                seq.block_tables[g].append(page)
        seq.block_hashes = [h for h, _ in found]
        seq.num_cached_tokens = len(found) * self.block_size
        self.num_hit_tokens += seq.num_cached_tokens
        return seq.num_cached_tokens

    def register_computed(self, seq: Sequence) -> None:
        """Register seq's full blocks computed (at its depth) since the last call. A block whose
        hash another sequence registered first keeps its own pages, unshared."""
        if not self.enable_prefix_caching or seq.depth is None:
            return
        groups = self.groups_for_depth(seq.depth)
        if len(seq.block_tables) < groups:
            return
        h = seq.block_hashes[-1] if seq.block_hashes else self._chain_start(seq.depth)
        for index in range(len(seq.block_hashes), seq.num_cached_tokens // self.block_size):
            h = self._block_hash(h, seq, index)
            seq.block_hashes.append(h)
            if h in self.cached:
                continue
            pages = tuple(seq.block_tables[g][index] for g in range(groups))
            self.cached[h] = pages
            for page in pages:
                self.page_hash[page] = h

    # ---- pages ------------------------------------------------------------------------------
    def _take_page(self) -> int:
        if not self.free_blocks:
            # Evict the least recently released registered block: its pages become plain free pages.
            h, pages = self.evictable.popitem(last=False)
            self._num_evictable_pages -= len(pages)
            del self.cached[h]
            for page in pages:
                del self.page_hash[page]
            self.free_blocks.extend(pages)
        return self.free_blocks.popleft()

    def _release(self, page: int) -> None:
        self.ref_count[page] -= 1
        if self.ref_count[page] > 0:
            return
        h = self.page_hash.get(page)
        if h is None:
            self.free_blocks.append(page)
            return
        # A registered block goes to the evictable list once none of its pages is held.
        pages = self.cached[h]
        if h not in self.evictable and all(self.ref_count[p] == 0 for p in pages):
            self.evictable[h] = pages
            self._num_evictable_pages += len(pages)
