"""What one forward step of `AdaptiveLlama` needs, built by the model runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadepth.model.kv_layout import KVLayout


@dataclass
class ForwardBatch:
    """Everything one forward step needs; built by the model runner.

    Rows are sequences, sorted by depth (deepest first). T is the number of new tokens per
    row (1 in decode, padded prompt length in prefill); S is the longest context in the batch.
    """
    input_ids: torch.Tensor        # (B, T) long
    positions: torch.Tensor        # (B, T) long; position of each new token in its sequence
    slot_mapping: torch.Tensor     # (B*T,) long; KV-cache slot each new token writes (padding -> scratch slot 0);
                                   # (G, B*T) with a `kv_layout`: one row per page group
    context_blocks: torch.Tensor | None  # decode: (B, nblk) long ((G, B, nblk) with a `kv_layout`); KV-cache blocks holding each row's
                                         # context (padded with scratch block 0); None in a prefill,
                                         # where every row starts at position 0 and attends to the fresh k/v
    attn_mask: torch.Tensor | None  # prefill: (B, 1, T, S=T) bool, True where query may attend to key;
                                    # None in decode (context_lens bounds each row's context)
    active_rows: list[int]         # per layer: rows [0, n) run it (host ints, from sorted depths)
    row_depths: list[int]          # (B,) depth of each row, descending
    last_index: torch.Tensor       # (B,) long; index in T of each row's last real token
    block_size: int = 1            # tokens per KV-cache block; context S = nblk * block_size
    context_lens: torch.Tensor | None = None  # decode: (B,) long, tokens each row attends to
                                              # (its context, this step's token included)
    depths: torch.Tensor | None = None  # (B,) int32 on the model's device: row_depths, for the
                                        # batched-skip kernels (built from row_depths when None;
                                        # given, the forward makes no host->device copy, so a
                                        # CUDA graph can capture it)
    # Chunked prefill (decode-shaped batches, one token per row): each (first_row, num_rows,
    # first_position) is a prompt chunk whose rows are consecutive tokens of one sequence. Their
    # attention runs as one SDPA over the sequence's gathered context instead of row by row.
    chunks: list[tuple[int, int, int]] | None = None
    # The engine's cache, paged by groups of layers (kv_layout.py): kv_cache is (s, 2, slots, Hkv, Dh)
    # and layer i reads position `position[i]` and its group's slot_mapping / context_blocks row.
    # None: kv_cache is (L, 2, slots, Hkv, Dh), one slice per layer, shared block tables.
    kv_layout: KVLayout | None = None
