"""`adadepth train`: stochastic-depth fine-tuning of a Hugging Face Llama-family model.

One optimizer step = `grad_accum` micro-batches. Each micro-batch:
  1. teacher pass (no grad): the frozen base at full depth - the same model with the LoRA
     adapter disabled (`peft.disable_adapter()`), or a frozen copy under full fine-tuning;
  2. student pass: every sample runs its own layer subset (`DropSchedule` + `StochasticDepth`);
  3. loss on the answer tokens: ce_weight * CE(reference) + kl_weight * KL(teacher || student)
     (+ early_exit_weight * CE of intermediate layers through the shared norm and LM head).

Schedules (learning rate, drop ramp) follow training progress = max(step / max_steps,
elapsed / max_minutes), so a time-budgeted run still warms up, ramps and decays completely.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import platform
import time
from enum import Enum

import torch

from adadepth.model.depth_plan import DepthPlan
from adadepth.model.loader import load_state_dict, resolve_model
from adadepth.training import artifact
from adadepth.training.chat_batches import Batch, ChatBatcher, tokenize_examples
from adadepth.training.data import Split, load_examples, read_train_file, sample_examples
from adadepth.training.drop_schedule import DropConfig, DropSchedule
from adadepth.training.losses import LossConfig, chunked_losses, target_positions
from adadepth.training.stochastic_depth import StochasticDepth
from adadepth.training.step_profile import OpProfile, PhaseTimer
from adadepth.training.train_config import AdapterConfig, TrainConfig

LOG_FILE = "train_log.jsonl"


def _jsonable(cfg) -> dict:
    return {k: (v.value if isinstance(v, Enum) else v) for k, v in dataclasses.asdict(cfg).items()}


def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


class Trainer:
    def __init__(self, config: TrainConfig, adapter: AdapterConfig, drops: DropConfig, losses: LossConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.config, self.adapter, self.drops, self.losses = config, adapter, drops, losses
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = torch.device(config.device)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
        torch.manual_seed(config.seed)
        resolved = resolve_model(config.model, config.cache_dir)
        if resolved.artifact_dir:
            raise ValueError(f"{config.model} is an adadepth artifact; train from its base model "
                             "(or --resume a checkpoint to continue a run)")
        self.resolved = resolved
        self.tokenizer = AutoTokenizer.from_pretrained(resolved.checkpoint_dir)
        base = AutoModelForCausalLM.from_pretrained(resolved.checkpoint_dir, dtype=torch.float32)
        base.config.use_cache = False
        self.num_layers = base.config.num_hidden_layers
        self.resume_dir = artifact.latest_checkpoint(config.output) if config.resume == "auto" else config.resume
        # A resumed run keeps the order it started with (stored in the checkpoint's layer_order.json).
        self.plan = DepthPlan.load(self.resume_dir) if self.resume_dir else self._layer_order(resolved.plan_dir)
        self.teacher = None
        self.base_state = None
        if adapter.full_finetune and config.init_adapter:
            raise ValueError("--init-adapter loads LoRA weights; it does not apply to --full-finetune")
        if adapter.full_finetune:
            keys = set(load_state_dict(resolved.checkpoint_dir))
            self.base_state = {k: v.detach().clone() for k, v in base.state_dict().items() if k in keys}
            if losses.needs_teacher:
                self.teacher = copy.deepcopy(base).eval().requires_grad_(False).to(self.device)
            self.model = base
        else:
            from peft import LoraConfig, get_peft_model

            lora = LoraConfig(r=adapter.lora_rank, lora_alpha=adapter.lora_alpha, lora_dropout=adapter.lora_dropout,
                              target_modules=adapter.target_modules, bias="none", task_type="CAUSAL_LM")
            self.model = get_peft_model(base, lora)
            if config.init_adapter:
                self._load_adapter(config.init_adapter)
        self.model.to(self.device).train()
        self.adapter_layers = self._adapter_layers()
        self.inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.stochastic = StochasticDepth(self.model)
        self.schedule = DropSchedule(drops, self.num_layers, self.plan.layer_order)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.95))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.batcher = self._batcher()
        self.step, self.tokens, self.elapsed_before = 0, 0, 0.0
        self.last_metrics: dict[str, float] = {}
        self.timer = PhaseTimer(self.device)
        self.stopped_by = "max_steps"

    # ---- setup ------------------------------------------------------------------------
    def _layer_order(self, plan_dir: str) -> DepthPlan:
        spec, n = self.config.layer_order, self.num_layers
        if spec == "early-exit":
            return DepthPlan.early_exit(n)
        if spec != "auto":
            plan = DepthPlan.load(spec)
            if plan.num_layers != n:
                raise ValueError(f"{spec}/layer_order.json is for {plan.num_layers} layers, model has {n}")
            return plan
        if DepthPlan.exists(plan_dir):
            plan = DepthPlan.load(plan_dir)
            if plan.source.startswith("calibrated") and plan.num_layers == n:
                return plan
        if not self.drops.uses_order:
            return DepthPlan.early_exit(n)  # only recorded; run `adadepth calibrate` on the artifact
        from adadepth.training.calibrate import CalibrateConfig, measure

        print(f"no calibrated layer order in {plan_dir}: calibrating (adadepth calibrate) first", flush=True)
        result, _ = measure(CalibrateConfig(model=self.config.model, cache_dir=self.config.cache_dir,
                                            data_dir=self.config.data_dir, device=self.config.device))
        try:
            result.plan.save(plan_dir)
        except OSError:
            pass  # a read-only model folder: the order still travels with the artifact
        return DepthPlan(n, result.plan.layer_order, result.plan.source)  # bypass maps are refitted after training

    def _load_adapter(self, folder: str) -> None:
        """Copy an artifact's LoRA weights into this run's (freshly initialised) adapter."""
        import json

        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        lora_dir = os.path.join(folder, artifact.LORA_DIR)
        try:
            with open(os.path.join(lora_dir, "adapter_config.json")) as f:
                saved = json.load(f)
            state = load_file(os.path.join(lora_dir, "adapter_model.safetensors"))
        except OSError as e:
            raise FileNotFoundError(f"--init-adapter {folder}: no LoRA adapter there ({e})") from None
        mine = set(self.adapter.target_modules)
        if saved.get("r") != self.adapter.lora_rank or set(saved.get("target_modules") or ()) != mine:
            raise ValueError(f"--init-adapter {folder} has rank {saved.get('r')} on {sorted(saved.get('target_modules') or ())}; "
                             f"this run has rank {self.adapter.lora_rank} on {sorted(mine)}")
        if float(saved.get("lora_alpha", 0)) != float(self.adapter.lora_alpha):
            raise ValueError(f"--init-adapter {folder} has lora_alpha {saved.get('lora_alpha')}, this run {self.adapter.lora_alpha}")
        result = set_peft_model_state_dict(self.model, {k: v.float() for k, v in state.items()})
        missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
        if missing or getattr(result, "unexpected_keys", []):
            raise ValueError(f"--init-adapter {folder} does not fit this model: missing {missing[:3]}, "
                             f"unexpected {list(getattr(result, 'unexpected_keys', []))[:3]}")

    def _batcher(self) -> ChatBatcher:
        cfg = self.config
        if cfg.train_file:
            examples, dropped = read_train_file(cfg.train_file)
            if dropped:
                print(f"{cfg.train_file}: dropped {dropped} lines whose prompt is in the held-out/calibration split",
                      flush=True)
            examples = examples[: cfg.max_examples or None]
        else:
            examples = (sample_examples(cfg.data_dir, Split.TRAIN, cfg.max_examples) if cfg.max_examples
                        else load_examples(cfg.data_dir, Split.TRAIN))
        chats = tokenize_examples(self.tokenizer, examples, cfg.max_seq_len)
        self.num_examples = len(chats)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        return ChatBatcher(chats, cfg.batch_size, pad, seed=cfg.seed)

    def _adapter_layers(self) -> list:
        """peft's LoRA layers, found once: toggling them directly costs nothing, whereas
        `PeftModel.disable_adapter()` walks and describes the whole model on every call."""
        if self.adapter.full_finetune:
            return []
        from peft.tuners.tuners_utils import BaseTunerLayer

        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    @contextlib.contextmanager
    def _adapters_off(self):
        for layer in self.adapter_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self.adapter_layers:
                layer.enable_adapters(True)

    # ---- schedules --------------------------------------------------------------------
    def progress(self, elapsed: float) -> float:
        p = self.step / self.config.max_steps
        if self.config.max_minutes:
            p = max(p, elapsed / (60 * self.config.max_minutes))
        return min(1.0, p)

    def lr_factor(self, progress: float) -> float:
        warm = self.config.warmup_fraction
        if progress < warm:
            return (progress + 1e-3) / warm
        x = (progress - warm) / max(1e-8, 1 - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, x)))

    # ---- one micro-batch --------------------------------------------------------------
    def _autocast(self):
        if self.config.dtype == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _teacher_states(self, batch: Batch) -> torch.Tensor:
        """(B, T, D) final hidden states of the frozen full-depth base."""
        with torch.no_grad():
            if self.teacher is not None:
                return self.teacher.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            with self._adapters_off():
                return self.inner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state

    def _self_teacher_states(self, batch: Batch, decision) -> torch.Tensor:
        """(B, T, D) teacher states for `self_distill`: rows that skip a layer get the student's
        own full depth (what `adadepth eval` scores a depth against: without this, reduced depths
        are pulled towards the base wherever training has moved full depth away from it); rows
        that keep every layer (full-depth anchors) get the base, so full depth stays near it."""
        full_rows = decision.keep.all(1)                                            # (B,) host bool
        if bool(full_rows.all()):
            return self._teacher_states(batch)
        with torch.no_grad():
            if not bool(full_rows.any()):
                return self.inner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            # Each row runs one teacher only: anchors through the base, the rest through the student.
            anchor = full_rows.nonzero().squeeze(1).to(self.device, non_blocking=True)        # (n_a,)
            reduced = (~full_rows).nonzero().squeeze(1).to(self.device, non_blocking=True)    # (n_r,)
            own = self.inner.model(input_ids=batch.input_ids[reduced],
                                   attention_mask=batch.attention_mask[reduced]).last_hidden_state  # (n_r, T, D)
            base = self._teacher_states(dataclasses.replace(
                batch, input_ids=batch.input_ids[anchor], attention_mask=batch.attention_mask[anchor]))  # (n_a, T, D)
            out = own.new_empty(batch.input_ids.shape[0], *own.shape[1:])                      # (B, T, D)
            return out.index_copy_(0, reduced, own).index_copy_(0, anchor, base.to(own.dtype))

    def micro_step(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        """Forward + backward of one host batch; returns detached device scalars (no sync)."""
        lc, timer = self.losses, self.timer
        timer.start()
        # Scored positions are found on the host: a `nonzero` on the device would wait for it.
        flat, labels = target_positions(batch.target_mask, batch.input_ids)         # (N,), (N,)
        flat, labels = flat.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        batch = batch.to(self.device)
        head, norm = self.inner.lm_head, self.inner.model.norm
        d = self.inner.config.hidden_size
        timer.mark("to_device")
        decision = self.schedule.sample(batch.input_ids.shape[0], progress, self.generator)
        with self._autocast():
            teacher_h = None
            if lc.needs_teacher:
                states = self._self_teacher_states(batch, decision) if lc.self_distill else self._teacher_states(batch)
                teacher_h = states.reshape(-1, d)[flat]                             # (N, D)
            timer.mark("teacher")
            self.stochastic.capture = [] if lc.early_exit_weight > 0 else None
            with self.stochastic.dropping(decision):
                h = self.inner.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            captured, self.stochastic.capture = self.stochastic.capture, None
            timer.mark("student")
            teacher_head = self.teacher.lm_head if self.teacher is not None else head
            ce, kl = chunked_losses(head, h.reshape(-1, d)[flat], labels, teacher_h, teacher_head,
                                    lc.distill_temperature, lc.loss_chunk_tokens)
            loss = lc.ce_weight * ce + lc.kl_weight * kl
            ee = torch.zeros((), device=self.device)
            if captured:
                exits = range(lc.early_exit_every - 1, self.num_layers - 1, lc.early_exit_every)
                for layer in exits:
                    exit_ce, _ = chunked_losses(lambda x: head(norm(x)), captured[layer].reshape(-1, d)[flat], labels,
                                                chunk=lc.loss_chunk_tokens)
                    ee = ee + exit_ce / len(exits)
                loss = loss + lc.early_exit_weight * ee
        timer.mark("loss")
        (loss / self.config.grad_accum).backward()
        timer.mark("backward")
        kept = decision.keep.float().sum(1).mean()
        return {"loss": loss.detach(), "ce": ce.detach(), "kl": kl.detach(), "early_exit": ee.detach(), "layers": kept}

    # ---- checkpoints ------------------------------------------------------------------
    def _meta(self, elapsed: float) -> dict:
        cfg = self.config
        return {
            "config": {"train": _jsonable(cfg), "adapter": _jsonable(self.adapter), "drops": _jsonable(self.drops),
                       "losses": _jsonable(self.losses)},
            "steps": self.step, "tokens": self.tokens, "train_examples": self.num_examples,
            "time_s": round(elapsed, 1), "tokens_per_s": round(self.tokens / max(elapsed, 1e-9), 1),
            "final_losses": self.last_metrics, "stopped_by": self.stopped_by,
            "layer_order_source": self.plan.source,
            "init_adapter": self.config.init_adapter and os.path.abspath(self.config.init_adapter),
            "hardware": hardware_name(self.device),
            "versions": self._versions(),
        }

    @staticmethod
    def _versions() -> dict:
        import transformers

        out = {"torch": torch.__version__, "transformers": transformers.__version__}
        try:
            import peft

            out["peft"] = peft.__version__
        except ImportError:
            pass
        return out

    def base_model_name(self) -> str:
        name = self.config.base_model_name or self.config.model
        return name if name.startswith("default") or os.path.isabs(name) else os.path.abspath(name)

    def save(self, folder: str, elapsed: float, with_state: bool) -> None:
        artifact.save_artifact(folder, self.model, base_model=self.base_model_name(), plan=self.plan,
                               train_meta=self._meta(elapsed), lora_save_dtype=self.adapter.lora_save_dtype,
                               base_state=self.base_state)
        if with_state:
            artifact.save_trainer_state(folder, {
                "trainable": {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad},
                "optimizer": self.optimizer.state_dict(), "step": self.step, "tokens": self.tokens,
                "elapsed": elapsed, "data_position": list(self.batcher.position),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                "layer_order": self.plan.layer_order, "layer_order_source": self.plan.source,
                "full_finetune": self.adapter.full_finetune, "lora_rank": self.adapter.lora_rank,
            })

    def restore(self, folder: str) -> None:
        state = artifact.load_trainer_state(folder)
        if state["full_finetune"] != self.adapter.full_finetune or (
                not self.adapter.full_finetune and state["lora_rank"] != self.adapter.lora_rank):
            raise ValueError(f"{folder} was trained with other adapter settings (full_finetune="
                             f"{state['full_finetune']}, lora_rank={state['lora_rank']})")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in state["trainable"].items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.tokens, self.elapsed_before = state["step"], state["tokens"], state["elapsed"]
        self.batcher.seek(tuple(state["data_position"]))
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.plan = DepthPlan(self.num_layers, list(state["layer_order"]), state["layer_order_source"])
        self.schedule = DropSchedule(self.drops, self.num_layers, self.plan.layer_order)

    # ---- the loop ---------------------------------------------------------------------
    def train(self) -> dict:
        from tqdm import tqdm

        cfg = self.config
        os.makedirs(cfg.output, exist_ok=True)
        if self.resume_dir:
            self.restore(self.resume_dir)
            print(f"resumed from {self.resume_dir} at step {self.step}", flush=True)
        budget = 60 * cfg.max_minutes
        t_start = time.perf_counter()
        tokens_start, step_start = self.tokens, self.step
        window: list[dict[str, float]] = []
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress_bar, desc="train", dynamic_ncols=True)
        log = open(os.path.join(cfg.output, LOG_FILE), "a")
        elapsed = self.elapsed_before
        ops = OpProfile(cfg.op_profile, self.device)
        try:
            while self.step < cfg.max_steps:
                if budget and elapsed >= budget:
                    self.stopped_by = "max_minutes"
                    break
                # Steps 2.. of this run (after warm-up) get a synchronised time breakdown.
                self.timer.active = 0 < self.step - step_start <= cfg.profile_steps
                self.timer.ms = {}
                ops.step(self.timer.active)
                progress = self.progress(elapsed)
                lr = cfg.lr * self.lr_factor(progress)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                micro = []
                for _ in range(cfg.grad_accum):
                    batch = self.batcher.next()
                    micro.append(self.micro_step(batch, progress))
                    self.tokens += batch.num_tokens
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.timer.start()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.timer.mark("optimizer")
                if self.timer.active:
                    print(json.dumps({"profile_step": self.step + 1, "tokens": batch.num_tokens,
                                      "rows_x_len": list(batch.input_ids.shape), "ms": self.timer.ms}), flush=True)
                self.step += 1
                elapsed = self.elapsed_before + time.perf_counter() - t_start
                window.extend(micro)  # device scalars: read back (one sync) only when logging
                speed = (self.tokens - tokens_start) / max(1e-9, time.perf_counter() - t_start)
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.last_metrics = _mean_metrics(window)
                    window = []
                    bar.set_postfix(loss=f"{self.last_metrics['loss']:.3f}", kl=f"{self.last_metrics['kl']:.3f}",
                                    tok_s=f"{speed:.0f}")
                    line = json.dumps({"step": self.step, **self.last_metrics, "lr": lr, "progress": round(progress, 4),
                                       "tokens": self.tokens, "tokens_per_s": round(speed, 1),
                                       "elapsed_s": round(elapsed, 1)})
                    log.write(line + "\n")
                    log.flush()
                    if not cfg.progress_bar:  # logs (and batch jobs) still see progress
                        print(line, flush=True)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save(artifact.checkpoint_dir(cfg.output, self.step), elapsed, with_state=True)
        except KeyboardInterrupt:
            self.stopped_by = "interrupted"
        finally:
            ops.step(False)
            bar.close()
            log.close()
        elapsed = self.elapsed_before + time.perf_counter() - t_start
        if window:  # steps since the last log line: log them too, so the log ends where training did
            self.last_metrics = _mean_metrics(window)
            with open(os.path.join(cfg.output, LOG_FILE), "a") as f:
                f.write(json.dumps({"step": self.step, **self.last_metrics, "tokens": self.tokens,
                                    "elapsed_s": round(elapsed, 1), "stopped_by": self.stopped_by}) + "\n")
        self.save(cfg.output, elapsed, with_state=False)
        return self._meta(elapsed)


def _mean_metrics(window: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    stacked = {k: torch.stack([m[k].float().cpu() for m in window]) for k in window[0]}
    return {k: round(float(v.mean()), 5) for k, v in stacked.items()}


def run_training(config: TrainConfig, adapter: AdapterConfig, drops: DropConfig, losses: LossConfig) -> dict:
    return Trainer(config, adapter, drops, losses).train()
