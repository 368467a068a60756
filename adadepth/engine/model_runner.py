"""Owns the model and its KV cache; turns a scheduled batch into sampled tokens.

Every step that carries prompt tokens (a prefill of newcomers, or prompt chunks riding a decode
step) runs packed: one row per token, no padding, so its matmuls cost the real tokens only (a
prefill padded to its longest prompt paid for ~1.8x the tokens of 16 held-out prompts). Each
prompt's attention is one SDPA over its sequence's paged context.

Routed prefill: when a prefill holds sequences without a depth, a depth router decides it from
this very prefill. Layers 0..k-1 (k = `router.feature_layers`, all run at every depth the router
may pick) run first with the undecided rows at full depth; the router reads their residual
stream, sets each undecided sequence's depth, the rows are re-sorted by their final depths and
layers k..L-1 continue from there. Nothing is computed twice.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from adadepth.engine.block_manager import BlockManager
from adadepth.engine.sampler import Sampler, SamplerOutput
from adadepth.engine.scheduler import PrefillChunk
from adadepth.engine.sequence import Sequence
from adadepth.model.adaptive_llama import AdaptiveLlama
from adadepth.model.forward_batch import ForwardBatch


@dataclass
class StepResult:
    sampled: SamplerOutput
    hidden: torch.Tensor  # (B, D) final normed hidden state of each row's last token
    # A step with prompt chunks samples only some of its sequences: these, in `sampled`'s order.
    seqs: list[Sequence] | None = None


class ModelRunner:
    def __init__(self, model: AdaptiveLlama, block_manager: BlockManager, sampler: Sampler,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.block_manager = block_manager
        self.sampler = sampler
        self.device = device
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        num_slots = block_manager.num_blocks * block_manager.block_size
        self.layout = block_manager.layout
        # (s, 2, slots, Hkv, Dh), s layers per page group (kv_layout.py): preallocated once; pages of
        # it are handed out by the block manager. Zeroed, so that every page is touched now: left
        # untouched, a server's memory grows for minutes as pages meet their first write.
        self.kv_cache = torch.zeros(self.layout.group_layers, 2, num_slots, cfg.num_key_value_heads, head_dim,
                                    dtype=dtype, device=device)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool, router=None) -> StepResult:
        """Run one step for seqs (any order): whole prompts (`is_prefill`) or one decode token each.
        Every sequence has a depth, unless `router` is given for a prefill: then the router decides
        the missing ones inside the step (see `run_mixed`). Results come back in seqs' order."""
        if is_prefill:
            result = self.run_mixed([], [PrefillChunk(s, 0, s.num_tokens, features_only=False) for s in seqs], router)
            index = {id(s): i for i, s in enumerate(seqs)}
            return in_callers_order([index[id(s)] for s in result.seqs], result.sampled, result.hidden)
        order = sorted(range(len(seqs)), key=lambda i: -seqs[i].depth)          # deepest first
        sorted_seqs = [seqs[i] for i in order]
        batch = self.prepare_decode(sorted_seqs)
        hidden = self.model(batch, self.kv_cache)                               # (B, D)
        logits = self.model.compute_logits(hidden)                              # (B, V)
        return in_callers_order(order, self.sampler(logits, sorted_seqs), hidden)

    @torch.inference_mode()
    def run_mixed(self, decode: list[Sequence], chunks: list[PrefillChunk], router=None) -> StepResult:
        """A step of decode rows and prompt pieces (whole prompts or chunks). Every token is a row
        of its own (T = 1): a prompt token attends, like a decode row, to its sequence's cached
        positions up to its own (the step writes the prompt's keys and values before any row reads
        them), so decode rows and prompts of any lengths share every matmul with no padding.

        Rows: first the tokens of `features_only` chunks (their sequences' depth is not picked
        yet; they run layers 0..k-1 only and feed the router), then the rest, deepest first. A
        whole prompt without a depth (a prefill of newcomers) runs layers 0..k-1 at full depth
        with everyone, the router reads its rows there and decides, and it carries on from layer k
        at its depth: nothing is computed twice. Samples for the decode rows and the pieces that
        complete their prompt."""
        feature_chunks = [c for c in chunks if c.features_only]
        num_layers = self.model.num_layers
        main = [(s, s.num_tokens - 1, 1) for s in decode] + [(c.seq, c.start, c.num_tokens) for c in chunks
                                                                if not c.features_only]
        main.sort(key=lambda piece: -_provisional(piece[0], num_layers))       # deepest first (stable)
        undecided = [p for p, (s, _, _) in enumerate(main) if s.depth is None]
        pieces = [(c.seq, c.start, c.num_tokens) for c in feature_chunks] + main
        depths = [num_layers] * len(feature_chunks) + [_provisional(s, num_layers) for s, _, _ in main]
        batch = self.prepare_tokens(pieces, depths)
        h = self.model.embed(batch)                                             # (N, 1, D)
        start = 0
        if feature_chunks or undecided:
            k = router.feature_layers
            h = self.model.run_layers(h, batch, self.kv_cache, 0, k)
            n_feat = sum(c.num_tokens for c in feature_chunks)
            self._pool_features(feature_chunks, h[:n_feat, 0], router)
            if not main:
                return _sampled_nothing(h)
            first_rows = _first_rows(main)
            if undecided:
                self._route_whole(main, undecided, first_rows, h[n_feat:, 0], router, k)
            # Re-sort by the final depths (stable: ties keep their order) and carry on from layer k.
            resort = sorted(range(len(main)), key=lambda p: -main[p][0].depth)
            rows = [n_feat + first_rows[p] + j for p in resort for j in range(main[p][2])]
            main = [main[p] for p in resort]
            batch = self._permute_rows(batch, rows, [s.depth for s, _, count in main for _ in range(count)])
            batch.chunks = [(r, count, first) for r, (_, first, count) in zip(_first_rows(main), main) if count > 1]
            h, start = h[torch.tensor(rows, device=h.device)], k
        h = self.model.run_layers(h, batch, self.kv_cache, start, num_layers)
        # The pieces that end their sequence sample its next token: every decode row, and each
        # piece that completes its prompt.
        sampling = [i for i, (s, first, count) in enumerate(main) if first + count == s.num_tokens]
        if not sampling:  # only prompt chunks that leave their prompt unfinished
            return _sampled_nothing(h)
        sampled_seqs = [main[i][0] for i in sampling]
        # Each sampled sequence's last token row.
        ends = torch.tensor([c for _, _, c in main]).cumsum(0) - 1              # (pieces,)
        last = ends[sampling]
        hidden = self.model.norm(h[last.to(h.device), 0])                       # (B, D)
        logits = self.model.compute_logits(hidden)                              # (B, V)
        return StepResult(self.sampler(logits, sampled_seqs), hidden, sampled_seqs)

    def _route_whole(self, main: list[tuple[Sequence, int, int]], undecided: list[int], first_rows: list[int],
                     h: torch.Tensor, router, k: int) -> None:
        """Decide the depth of the whole prompts main[p], p in `undecided`, from their rows of h
        ((tokens, D), after the feature layers; piece p's rows start at first_rows[p])."""
        from adadepth.router.prefill_features import PrefillFeatures, PrefillFeatureSum

        seqs = [main[p][0] for p in undecided]
        features = PrefillFeatures.cat([
            PrefillFeatureSum.start(h[first_rows[p]: first_rows[p] + main[p][2]]).features() for p in undecided])
        rank = self.model.rank
        for seq, decision in zip(seqs, router.route_features(features, seqs)):
            if any(rank[layer] >= decision.depth for layer in range(k)):
                raise ValueError(f"router chose depth {decision.depth}, which skips one of the layers 0..{k - 1} "
                                 "it already ran; its depths must include its feature layers")
            seq.depth, seq.depth_decision = decision.depth, decision

    @staticmethod
    def _pool_features(chunks: list[PrefillChunk], h: torch.Tensor, router) -> None:
        """h: (tokens, D) the feature layers' output for `chunks`' tokens, in order. Adds each
        chunk to its sequence's pooled features; a prompt whose last chunk this was gets its depth."""
        from adadepth.router.prefill_features import PrefillFeatures, PrefillFeatureSum

        done, offset = [], 0
        for c in chunks:
            rows = h[offset: offset + c.num_tokens]                             # (c, D)
            offset += c.num_tokens
            if c.seq.router_features is None:
                c.seq.router_features = PrefillFeatureSum.start(rows)
            else:
                c.seq.router_features.add(rows)
            if c.seq.num_feature_tokens == c.seq.num_tokens:
                done.append(c.seq)
        if not done:
            return
        features = PrefillFeatures.cat([s.router_features.features() for s in done])
        for seq, decision in zip(done, router.route_features(features, done)):
            seq.depth, seq.depth_decision, seq.router_features = decision.depth, decision, None

    def _permute_rows(self, batch: ForwardBatch, perm: list[int], row_depths: list[int]) -> ForwardBatch:
        """batch with its rows reordered (new row j = old row perm[j]) and depths `row_depths`."""
        b, t = batch.input_ids.shape
        p = torch.tensor(perm, device=batch.input_ids.device)
        groups = batch.slot_mapping.shape[0]
        return ForwardBatch(
            input_ids=batch.input_ids[p], positions=batch.positions[p],
            slot_mapping=batch.slot_mapping.view(groups, b, -1)[:, p].reshape(groups, -1),
            context_blocks=None if batch.context_blocks is None else batch.context_blocks[:, p], kv_layout=self.layout,
            attn_mask=None if batch.attn_mask is None else batch.attn_mask[p], active_rows=self.model.active_rows(row_depths),
            row_depths=list(row_depths), last_index=batch.last_index[p], block_size=batch.block_size,
            depths=self._depths_tensor(row_depths),
            context_lens=None if batch.context_lens is None else batch.context_lens[p])

    # ---- batch preparation ------------------------------------------------------------
    def _depths_tensor(self, depths: list[int]) -> torch.Tensor | None:
        """(B,) int32 row depths on the device, for the batched-skip path only (the slicing path
        reads the host list): built here, the forward needs no host->device copy of its own."""
        if not self.model.use_batched_skip_kernels:
            return None
        return torch.tensor(depths, dtype=torch.int32).to(self.device)            # (B,)

    def _block_table(self, seqs: list[Sequence], num_blocks: int) -> torch.Tensor:
        """(G, B, num_blocks) long: each seq's first num_blocks pages in each page group, padded
        with scratch page 0 (so are the groups its depth does not reach)."""
        groups = self.layout.num_groups
        flat: list[int] = []
        for s in seqs:
            tables = s.block_tables
            for g in range(groups):
                blocks = tables[g][:num_blocks] if g < len(tables) else []
                flat += blocks
                flat += [0] * (num_blocks - len(blocks))
        table = torch.tensor(flat, dtype=torch.long).view(len(seqs), groups, num_blocks)   # (B, G, nblk)
        return table.transpose(0, 1).contiguous()                              # (G, B, nblk)

    def prepare_tokens(self, pieces: list[tuple[Sequence, int, int]], depths: list[int]) -> ForwardBatch:
        """One row per token: positions [first, first + count) of each piece's sequence, at the
        piece's depth (`depths`, descending). Every row reads its sequence's paged context up to
        and including its own position."""
        bs = self.block_manager.block_size
        counts = torch.tensor([count for _, _, count in pieces])                # (P,)
        positions = torch.cat([torch.arange(first, first + count) for _, first, count in pieces])   # (N,)
        ids = torch.tensor([t for s, first, count in pieces for t in s.token_ids[first: first + count]])
        num_blocks = max(first + count - 1 for _, first, count in pieces) // bs + 1
        table = self._block_table([s for s, _, _ in pieces], num_blocks)        # (G, P, nblk)
        table = table.repeat_interleave(counts, dim=1)                          # (G, N, nblk)
        index = (positions // bs)[None, :, None].expand(table.shape[0], -1, 1)  # (G, N, 1)
        slots = table.gather(2, index)[..., 0] * bs + positions % bs            # (G, N)
        row_depths = [d for d, (_, _, count) in zip(depths, pieces) for _ in range(count)]
        chunks = [(r, count, first) for r, (_, first, count) in zip(_first_rows(pieces), pieces) if count > 1]
        return ForwardBatch(
            input_ids=ids[:, None].to(self.device), positions=positions[:, None].to(self.device),
            slot_mapping=slots.to(self.device), context_blocks=table.to(self.device), attn_mask=None,
            kv_layout=self.layout,
            active_rows=self.model.active_rows(row_depths), row_depths=row_depths,
            depths=self._depths_tensor(row_depths),
            last_index=torch.zeros(len(row_depths), dtype=torch.long, device=self.device), block_size=bs,
            context_lens=(positions + 1).to(self.device), chunks=chunks)

    def prepare_decode(self, seqs: list[Sequence]) -> ForwardBatch:
        # The newest token (position num_tokens-1) has no KV yet: this step writes it.
        bs = self.block_manager.block_size
        positions = torch.tensor([s.num_tokens - 1 for s in seqs])              # (B,)
        num_blocks = int(positions.max()) // bs + 1
        table = self._block_table(seqs, num_blocks)                             # (G, B, nblk)
        rows = torch.arange(len(seqs))
        new_slots = table[:, rows, positions // bs] * bs + positions % bs       # (G, B)
        ids = torch.tensor([s.token_ids[-1] for s in seqs])[:, None]            # (B, 1)
        depths = [s.depth for s in seqs]
        return ForwardBatch(
            input_ids=ids.to(self.device), positions=positions[:, None].to(self.device),
            slot_mapping=new_slots.to(self.device), context_blocks=table.to(self.device), kv_layout=self.layout,
            attn_mask=None, active_rows=self.model.active_rows(depths), row_depths=depths,
            depths=self._depths_tensor(depths),
            last_index=torch.zeros(len(seqs), dtype=torch.long, device=self.device), block_size=bs,
            context_lens=(positions + 1).to(self.device))


def _provisional(seq: Sequence, num_layers: int) -> int:
    """A sequence's depth, or full depth while the router has yet to pick one."""
    return num_layers if seq.depth is None else seq.depth


def _first_rows(pieces: list[tuple[Sequence, int, int]]) -> list[int]:
    """Row of each piece's first token, pieces laid out one after another."""
    rows, row = [], 0
    for _, _, count in pieces:
        rows.append(row)
        row += count
    return rows


def _sampled_nothing(h: torch.Tensor) -> StepResult:
    return StepResult(SamplerOutput([], []), h.new_zeros(0, h.shape[-1]), [])


def in_callers_order(order: list[int], sampled: SamplerOutput, hidden: torch.Tensor) -> StepResult:
    """Results computed for rows seqs[order[0]], seqs[order[1]], ... put back in seqs' order."""
    inverse = [0] * len(order)
    for pos, i in enumerate(order):
        inverse[i] = pos
    return StepResult(
        SamplerOutput([sampled.token_ids[p] for p in inverse], [sampled.logprobs[p] for p in inverse]),
        hidden[torch.tensor(inverse, device=hidden.device)])
