"""The engine: add requests, call `step()` until done, read `RequestOutput`s.

One step = schedule -> (prefill: pick depths) -> model runner -> sample -> detokenize/stop checks.
`LLM` (offline) and the HTTP server both drive this object; it is not thread-safe, so the server
owns it from a single engine thread.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import torch

from adadepth.config import DepthPolicyMode, EngineConfig
from adadepth.engine.block_manager import BlockManager
from adadepth.engine.detokenizer import Detokenizer
from adadepth.engine.load_controller import LoadController, LoadState
from adadepth.engine.model_runner import ModelRunner
from adadepth.engine.sampler import Sampler
from adadepth.engine.scheduler import Scheduler
from adadepth.engine.sequence import Sequence
from adadepth.model.adaptive_llama import AdaptiveLlama
from adadepth.model.depth_plan import DepthPlan
from adadepth.model.kv_layout import KVLayout
from adadepth.model.loader import apply_artifact, load_config, load_plan, load_state_dict, resolve_model
from adadepth.outputs import CompletionOutput, DepthDecision, RequestMetrics, RequestOutput
from adadepth.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    depth_allowance: int | None = None  # --depth-policy load's current allowance
    prefix_cache_queries: int = 0       # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0          # of those, found computed


@dataclass
class StepInfo:
    """What the last step did, for metrics."""
    is_prefill: bool
    num_seqs: int
    num_tokens: int
    layers_executed: int  # sum over processed tokens of layers run
    layers_skipped: int
    duration_s: float
    num_chunks: int = 0         # prompt chunks carried by a decode step (chunked prefill)
    num_prompt_tokens: int = 0  # tokens prefilled at their depth (prompts, or outputs recomputed)


class LLMEngine:
    def __init__(self, config: EngineConfig, depth_router=None):
        self.config = config
        mc = config.model
        if mc.num_threads:
            torch.set_num_threads(mc.num_threads)
        t0 = time.perf_counter()
        resolved = resolve_model(mc.model, mc.cache_dir)
        self.model_name = mc.served_model_name or resolved.name
        hf_config = load_config(resolved.checkpoint_dir)
        state = load_state_dict(resolved.checkpoint_dir)
        if resolved.artifact_dir:
            state = apply_artifact(state, resolved.artifact_dir)
        plan = load_plan(resolved.plan_dir, hf_config.num_hidden_layers)
        dtype_name = mc.resolved_dtype()
        self.dtype = DTYPES[dtype_name]
        self.device = torch.device(mc.device)
        if mc.dtype == "auto":
            logger.info("dtype auto: %s on this %s", self.dtype, mc.device)
        model = AdaptiveLlama.from_state_dict(hf_config, plan, state)
        del state
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.model.inv_freq = self.model.inv_freq.float()  # rope angles stay fp32 whatever the dtype
        self.model.use_batched_skip_kernels = self.device.type == "cuda"
        cpu_fast_dtype = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16)
        ops = None
        if mc.cpu_kernels and cpu_fast_dtype:
            from adadepth.kernels.cpu_ops import load_cpu_ops

            ops = load_cpu_ops(os.path.join(mc.cache_dir, "extensions"))
        # The paired kernel reads float16 copies only through the packed matmuls.
        half_weight_kernel = ops is not None and ops.paired_half_weights and mc.cpu_weight_prepack
        self.weight_dtype = DTYPES[mc.resolved_weight_dtype(dtype_name, half_weight_kernel)]
        if self.weight_dtype != self.dtype:
            self.model.round_weights(self.weight_dtype)
            logger.info("weights rounded to %s (%s)%s", self.weight_dtype, mc.weight_dtype,
                        "" if half_weight_kernel else "; no kernel here reads them at 2 bytes: float32 speed")
        if mc.cpu_weight_prepack and cpu_fast_dtype:
            self.model.pack_linears()
        if mc.cpu_kernels and cpu_fast_dtype:
            self.model.use_ops(ops, self.weight_dtype if self.weight_dtype != self.dtype and half_weight_kernel else None)
        if not DepthPlan.exists(resolved.plan_dir):
            self._store_heuristic_plan(resolved.plan_dir)

        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(resolved.checkpoint_dir)
        eos = {hf_config.eos_token_id} if isinstance(hf_config.eos_token_id, int) else set(hf_config.eos_token_id or [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = eos
        self.max_model_len = min(config.scheduler.max_model_len, getattr(hf_config, "max_position_embeddings", 1 << 30))
        layout = KVLayout.for_ranks(self.model.rank, config.cache.kv_group_layers)
        # A computed prefix is taken up by the chunk path (it starts a prompt past position 0).
        self.block_manager = BlockManager(config.cache.num_pages(layout.num_groups), config.cache.block_size, layout,
                                          config.cache.enable_prefix_caching and config.scheduler.prefill_chunk_tokens > 0)
        self.runner = ModelRunner(self.model, self.block_manager, Sampler(eos), self.dtype, self.device)
        self.detokenizer = Detokenizer(self.tokenizer)
        if depth_router is None:
            # The router trained for this model and layer order, stored beside its plan (if any).
            from adadepth.router.difficulty_router import DifficultyRouter

            depth_router = DifficultyRouter.find(resolved.plan_dir, self.plan, hf_config.hidden_size)
            if depth_router is not None:
                logger.info("depth router loaded from %s (grid %s)", resolved.plan_dir, list(depth_router.grid.depths))
        self.depth_router = depth_router
        if depth_router is None:
            self.scheduler = Scheduler(config.scheduler, self.block_manager, self.num_layers)
        else:  # a chunk of a router pass runs its k feature layers of the L
            k = depth_router.feature_layers
            self.scheduler = Scheduler(config.scheduler, self.block_manager, self.num_layers,
                                       feature_cost=max(1, k) / self.num_layers,
                                       feature_depth=max((self.model.rank[i] + 1 for i in range(k)), default=1))
        self.load_controller: LoadController | None = None
        if config.depth_policy.policy is DepthPolicyMode.LOAD:
            if depth_router is None:
                logger.warning("--depth-policy load needs a depth router; without one every request runs full depth")
            else:
                self.load_controller = LoadController(config.depth_policy, list(depth_router.grid.depths),
                                                      self.num_layers, config.scheduler.prefill_chunk_tokens)
        self.seqs: dict[str, Sequence] = {}
        # Made on the first constrained request (its tokenizer table takes a fraction of a second).
        self._structured = None
        self._structured_lock = threading.Lock()
        self.last_step: StepInfo | None = None
        self.load_time_s = time.perf_counter() - t0
        logger.info("loaded %s (%d layers) in %.1fs", self.model_name, self.num_layers, self.load_time_s)

    # ---- properties -------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def plan(self) -> DepthPlan:
        return self.model.plan

    def stats(self) -> EngineStats:
        allowance = None if self.load_controller is None else self.load_controller.allowance
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage, allowance,
                           bm.num_queried_tokens, bm.num_hit_tokens)

    # ---- requests ---------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> DepthDecision | None:
        """Raise ValueError for a request that cannot run; return its depth if already decided."""
        if not prompt_token_ids:
            raise ValueError("prompt is empty: send at least one token")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt_token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the context length {self.max_model_len}; shorten the prompt or lower max_tokens")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        bad_bias = [t for t in params.logit_bias if t >= vocab]
        if bad_bias:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}), got {bad_bias[:5]}")
        # They index the logits (min_tokens bans them): out of range, one would fail the engine's step,
        # and a negative one would ban another token.
        bad_stops = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad_stops:
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {bad_stops[:5]}")
        if params.structured_outputs is not None:
            self.structured_outputs().compile(params.structured_outputs)  # cached: admission reuses it
        depth = params.resolve_depth(self.num_layers)
        if depth is not None:
            return DepthDecision(depth, self.num_layers, "request", params.quality)
        if self.depth_router is None:
            return DepthDecision(self.num_layers, self.num_layers, "default", params.quality)
        if params.quality is not None and params.quality >= 1.0:
            # Only full depth is sure to agree with full depth: the router would pick it anyway, after
            # a pass of the prompt through its feature layers and a second prefill from position 0.
            return DepthDecision(self.num_layers, self.num_layers, "router", params.quality, 1.0)
        return None

    def structured_outputs(self):
        """The grammar compiler and bitmask filler shared by all constrained requests (thread-safe:
        the server compiles on worker threads while the engine thread samples)."""
        with self._structured_lock:
            if self._structured is None:
                from adadepth.engine.structured_output import StructuredOutputManager

                self._structured = StructuredOutputManager(self.tokenizer, self.model.config.vocab_size,
                                                           self.eos_token_ids)
                self.runner.sampler.structured = self._structured
            return self._structured

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.seqs:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, str):
            prompt_text, prompt_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, prompt_ids = None, list(prompt)
        decision = self.validate(prompt_ids, params)
        seq = Sequence(request_id, prompt_text, prompt_ids, params,
                       arrival_time=arrival_time if arrival_time is not None else time.monotonic())
        if decision is not None:
            seq.depth, seq.depth_decision = decision.depth, decision
        if params.structured_outputs is not None:
            seq.grammar = self.structured_outputs().matcher(params.structured_outputs)
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        self.seqs[request_id] = seq
        self.scheduler.add(seq)
        if self.load_controller is not None:
            self.load_controller.observe_arrival(len(prompt_ids), time.monotonic())

    def abort_request(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            seq.finish_reason = "abort"
            self.scheduler.finish(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        controller = self.load_controller
        if controller is not None:
            controller.update(self.load_state(), time.monotonic())
        scheduled = self.scheduler.schedule()
        if scheduled is None:
            return []
        t0 = time.perf_counter()
        seqs = scheduled.seqs
        chunks = scheduled.chunks
        if controller is not None:  # what the router may give the prompts it decides in this step
            for seq in [*seqs, *(c.seq for c in chunks)]:
                if seq.depth is None:
                    seq.depth_allowance = controller.allowance
        # Work, counted before the sampled tokens are appended (num_tokens grows by one below).
        if scheduled.is_prefill:
            tokens = [s.num_tokens for s in seqs]
            prompt_tokens = sum(tokens)
        else:
            tokens, prompt_tokens = [1] * len(seqs), sum(c.num_tokens for c in chunks if not c.features_only)
        if chunks:
            # The router decides inside the step for chunks that finish their feature pass.
            k = self.depth_router.feature_layers if self.depth_router is not None else 0
            decode_layers = sum(s.depth for s in seqs)
            executed = decode_layers + sum(c.num_tokens * (k if c.features_only else c.seq.depth) for c in chunks)
            result = self.runner.run_mixed(seqs, chunks, self.depth_router)
            for c in chunks:
                if not c.features_only:
                    c.seq.num_cached_tokens = c.start + c.num_tokens
                    self.block_manager.register_computed(c.seq)
            seqs = result.seqs
        else:
            # Sequences without a depth get theirs from the router inside this prefill (ModelRunner).
            router = self.depth_router if scheduled.is_prefill and any(s.depth is None for s in seqs) else None
            result = self.runner.run(seqs, scheduled.is_prefill, router)
            if router is not None:  # routed prompts reserved full depth; keep their depth's pages
                for seq in seqs:
                    self.block_manager.trim(seq, seq.depth)
            executed = sum(n * s.depth for n, s in zip(tokens, seqs))
            decode_layers = 0 if scheduled.is_prefill else executed
        num_tokens = sum(tokens) + sum(c.num_tokens for c in chunks)
        now = time.monotonic()
        outputs = []
        for seq, token, logprobs in zip(seqs, result.sampled.token_ids, result.sampled.logprobs):
            seq.num_cached_tokens = seq.num_tokens  # every token fed so far; the new one is not
            self.block_manager.register_computed(seq)  # before the token: finishing frees the pages
            self._append_token(seq, token, logprobs, now)
            outputs.append(self._make_output(seq))
            if seq.is_finished:
                self.seqs.pop(seq.request_id, None)
        self.last_step = StepInfo(scheduled.is_prefill, len(scheduled.seqs), num_tokens, executed,
                                  num_tokens * self.num_layers - executed, time.perf_counter() - t0,
                                  num_chunks=len(chunks), num_prompt_tokens=prompt_tokens)
        if controller is not None:
            controller.observe_step(decode_layers, executed - decode_layers, self.last_step.duration_s)
        return outputs

    def load_state(self) -> LoadState:
        """What the load controller needs: the depths that will decode, and the queue."""
        now = time.monotonic()
        fixed = num_open = num_raised = prompt_tokens = 0
        floors: list[int] = []
        oldest = now
        for seq in (*self.scheduler.running, *self.scheduler.waiting):
            source = seq.depth_decision.source if seq.depth_decision is not None else None
            if seq.depth is None:
                num_open += 1
            elif source == "load":
                num_raised += 1
            elif source == "router":
                floors.append(seq.depth)
            else:
                fixed += seq.depth
            if not seq.is_prefilled:
                prompt_tokens += seq.num_tokens - seq.num_cached_tokens
            if seq.first_token_time is None:
                oldest = min(oldest, seq.arrival_time)
        return LoadState(fixed, floors, num_raised, num_open, prompt_tokens, now - oldest)

    def _append_token(self, seq: Sequence, token: int, logprobs, now: float) -> None:
        seq.output_token_ids.append(token)
        if logprobs is not None:
            seq.output_logprobs.append(logprobs)
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        before = len(seq.output_text)
        self.detokenizer.update(seq)
        p = seq.params
        n_out = len(seq.output_token_ids)
        reason = None
        if seq.grammar is not None and self._grammar_done(seq, token):
            reason, seq.stop_reason = "stop", None
        elif not p.ignore_eos and token in self.eos_token_ids and n_out >= p.min_tokens:
            reason, seq.stop_reason = "stop", None
        elif token in p.stop_token_ids and n_out >= p.min_tokens:
            reason, seq.stop_reason = "stop", token
        else:
            stop = self.detokenizer.check_stop_strings(seq, len(seq.output_text) - before) if n_out >= p.min_tokens else None
            if stop is not None:
                reason, seq.stop_reason = "stop", stop
            elif n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
                reason = "length"
        if reason is not None:
            if not isinstance(seq.stop_reason, str):  # a stop string already cut the text
                self.detokenizer.flush(seq)
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    @staticmethod
    def _grammar_done(seq: Sequence, token: int) -> bool:
        """Advance seq's grammar; True once it is complete. A token the grammar refuses (only when
        every token was masked, e.g. a grammar with nothing left to allow) ends the output there."""
        if not seq.grammar.accept_token(token):
            logger.warning("request %s: token %d is outside its grammar; ending the output", seq.request_id, token)
            return True
        return seq.grammar.is_terminated()

    def _make_output(self, seq: Sequence) -> RequestOutput:
        """What is new for seq since its last output: O(new tokens), not O(all tokens so far)."""
        visible = self.detokenizer.visible_length(seq)
        text = seq.output_text[seq.num_emitted_chars: visible]
        seq.num_emitted_chars = max(seq.num_emitted_chars, visible)
        start, seq.num_emitted_tokens = seq.num_emitted_tokens, len(seq.output_token_ids)
        completion = CompletionOutput(
            index=0, text=text, token_ids=seq.output_token_ids[start:],
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
            logprobs=seq.output_logprobs[start:] if seq.params.logprobs is not None else None,
            num_tokens=len(seq.output_token_ids))
        metrics = RequestMetrics(seq.arrival_time, seq.first_scheduled_time, seq.first_token_time,
                                 seq.last_token_time, time.monotonic() if seq.is_finished else None)
        return RequestOutput(seq.request_id, seq.prompt, seq.prompt_token_ids, [completion],
                             seq.is_finished, seq.depth_decision, metrics)

    # ---- depth plan before calibration ------------------------------------------------
    def _store_heuristic_plan(self, plan_dir: str) -> None:
        """No calibrated order yet: rank layers by how much they change their input (1 - cos)
        on a short built-in text, keep the most influential, and store the order beside the model."""
        from adadepth.model.heuristic_order import influence_order

        plan = influence_order(self.model, self.device)
        self.model.plan = plan
        self.model.rank = plan.rank
        try:
            plan.save(plan_dir)
        except OSError as exc:  # a read-only checkpoint folder: keep the order in memory only
            logger.warning("could not store layer order in %s: %s", plan_dir, exc)
