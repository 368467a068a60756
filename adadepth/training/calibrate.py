"""Measure the layer order (and optional linear bypass maps) on calibration prompts.

``greedy`` (default): backward elimination. Starting from the full model, repeatedly drop the
layer whose removal - given the layers already dropped - moves the output least from the full
model, measured teacher-forced on a batch of train-split prompts (mean KL(full || reduced) over
all positions, or disagreement of the argmax). Dropping in that sequence is exactly the nested
order serving uses: layer_order = [last survivor] + reversed(drop sequence).

``cos``: one pass, rank layers by how much they change their input (1 - cos(in, out)).

``bypass``: ReplaceMe-style, each dropped layer gets a linear map fitted by identity-regularised
ridge regression, h_out ~ h_in @ T + b, where h_in is the layer's input *in the reduced model
at the depth where the layer is first dropped* (so earlier drops are part of what it corrects)
and h_out is the full model's state after that layer. With greedy, candidates are scored with
their fitted map, and a map is kept only when it beats the identity.

When the model already has an order, it is scored the same way and kept if it measures better
(`compare_existing`): a trained model's order is replaced only by evidence.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from adadepth.config import _default_cache_dir, output_dir_for
from adadepth.model.adaptive_llama import AdaptiveLlama
from adadepth.model.depth_plan import DepthPlan
from adadepth.training.chat_batches import encode_chat
from adadepth.training.data import DEFAULT_DATA_DIR, Split, sample_examples
from adadepth.training.sequence_forward import SequenceBatch, SequenceForward


class CalibMethod(str, Enum):
    GREEDY = "greedy"
    COS = "cos"

    def __str__(self) -> str:
        return self.value


class CalibMetric(str, Enum):
    KL = "kl"
    AGREEMENT = "agreement"

    def __str__(self) -> str:
        return self.value


@dataclass
class CalibrateConfig:
    model: str = field(default="default-base", metadata={"help": "model or artifact folder to calibrate"})
    cache_dir: str = field(default_factory=_default_cache_dir, metadata={"help": "where converted models are cached"})
    data_dir: str = field(default=DEFAULT_DATA_DIR, metadata={"help": "the shared data folder (train split is used)"})
    output: str | None = field(default=None, metadata={
        "help": "folder to store layer_order.json (+ bypass.safetensors); default: with the model"})
    method: CalibMethod = field(default=CalibMethod.GREEDY, metadata={"help": "greedy (measured) or cos (fast)"})
    metric: CalibMetric = field(default=CalibMetric.KL, metadata={"help": "greedy: kl or agreement"})
    bypass: bool = field(default=False, metadata={"help": "fit linear bypass maps for skipped layers"})
    bypass_min_depth: int = field(default=1, metadata={
        "help": "fit bypass maps only for layers first dropped at depth >= this (smaller file)"})
    ridge: float = field(default=0.05, metadata={
        "help": "bypass: identity regularisation, relative to the mean eigenvalue of the input covariance"})
    keep_order: bool = field(default=False, metadata={
        "help": "keep the model's current order; only (re)fit bypass maps along it"})
    compare_existing: bool = field(default=True, metadata={
        "help": "score the model's current order too and keep whichever is better"})
    num_prompts: int = field(default=32, metadata={"help": "calibration prompts (train split)"})
    seq_len: int = field(default=128, metadata={"help": "tokens per calibration sequence (prompt + answer)"})
    score_min_fraction: float = field(default=0.5, metadata={
        "help": "orders are compared by their mean score over depths [ceil(f*L), L-1]"})
    device: str = field(default="cpu", metadata={"help": "cpu or cuda[:N]"})
    dtype: str = field(default="float32", metadata={"help": "float32 or bfloat16"})
    num_threads: int = field(default=0, metadata={"help": "torch CPU threads; 0 keeps torch's default"})

    def __post_init__(self) -> None:
        self.method, self.metric = CalibMethod(self.method), CalibMetric(self.metric)
        if self.num_prompts < 1 or self.seq_len < 8:
            raise ValueError("num_prompts must be >= 1 and seq_len >= 8")
        if self.ridge < 0 or self.bypass_min_depth < 1:
            raise ValueError("ridge must be >= 0 and bypass_min_depth >= 1")
        if not 0 < self.score_min_fraction <= 1:
            raise ValueError("score_min_fraction must be in (0, 1]")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError("dtype must be float32 or bfloat16")


@dataclass
class CalibrationResult:
    plan: DepthPlan
    scores: dict[int, float]            # depth -> score of the chosen order (lower is better)
    candidate_scores: dict[str, float]  # "measured"/"existing" -> mean score over serving depths
    chosen: str
    seconds: float


def calibration_sequences(tokenizer, data_dir: str, num_prompts: int, seq_len: int) -> list[list[int]]:
    """Token ids of `num_prompts` train-split chats (prompt + reference answer), cut to seq_len."""
    examples = sample_examples(data_dir, Split.TRAIN, num_prompts)
    return [encode_chat(tokenizer, ex.messages, ex.completion).input_ids[:seq_len] for ex in examples]


def _shared_prefix(sequences: list[list[int]]) -> int:
    n = min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != sequences[0][i] for s in sequences):
            return i
    return n


class Calibrator:
    def __init__(self, model: AdaptiveLlama, sequences: list[list[int]], config: CalibrateConfig):
        self.model = model
        self.config = config
        self.num_layers = model.num_layers
        self.fwd = SequenceForward(model)
        seqs = SequenceBatch.build(sequences, self.fwd.device)
        # Positions inside the prefix every sequence shares (the system prompt) say nothing about
        # one order versus another; skip them unless that would leave nothing to score.
        prefix = min(_shared_prefix(sequences), min(len(s) for s in sequences) - 1)
        positions = torch.arange(seqs.input_ids.shape[1], device=self.fwd.device)
        self.score_mask = seqs.valid & (positions[None, :] >= prefix)               # (B, T)
        self.fit_mask = seqs.valid                                                   # (B, T)
        self.h0, self.rope, self.batch, self.kv = self.fwd.embed(seqs)
        full: list[torch.Tensor] = []
        final = self.fwd.run_layers(self.h0, self.rope, self.batch, self.kv, 0, [True] * self.num_layers, {}, full)
        self.full_states = full + [final]                                            # L+1 x (B, T, D)
        self._teacher = self._distribution(final)

    # ---- scoring ----------------------------------------------------------------------
    @torch.inference_mode()
    def _distribution(self, final: torch.Tensor) -> list[torch.Tensor]:
        """Per chunk of scored positions: log-probs (KL metric) or argmax ids (agreement)."""
        out = []
        for h in self._scored_chunks(final):
            logits = self.fwd.logits(self.model.norm(h))                            # (n, V)
            out.append(F.log_softmax(logits, -1) if self.config.metric is CalibMetric.KL else logits.argmax(-1))
        return out

    def _scored_chunks(self, final: torch.Tensor, chunk: int = 1024):
        h = final[self.score_mask]                                                   # (N, D)
        for start in range(0, h.shape[0], chunk):
            yield h[start: start + chunk]

    @torch.inference_mode()
    def score(self, final: torch.Tensor) -> float:
        """Distance of a reduced model's final residual stream from the full model's (lower is better)."""
        total, count = 0.0, 0
        for h, teacher in zip(self._scored_chunks(final), self._teacher):
            logits = self.fwd.logits(self.model.norm(h))                            # (n, V)
            if self.config.metric is CalibMetric.KL:
                total += float(F.kl_div(F.log_softmax(logits, -1), teacher, log_target=True, reduction="sum"))
            else:
                total += float((logits.argmax(-1) != teacher).sum())
            count += h.shape[0]
        return total / count

    # ---- bypass fitting ---------------------------------------------------------------
    @torch.inference_mode()
    def fit_bypass(self, layer: int, h_in: torch.Tensor) -> nn.Linear:
        """Ridge fit of the full model's state after `layer` from this reduced model's input to it."""
        x = h_in[self.fit_mask].double()                                             # (M, D)
        y = self.full_states[layer + 1][self.fit_mask].double()                      # (M, D)
        x_mean, y_mean = x.mean(0), y.mean(0)
        xc, yc = x - x_mean, y - y_mean
        d = x.shape[1]
        xtx = xc.T @ xc                                                              # (D, D)
        lam = self.config.ridge * float(torch.diagonal(xtx).mean())
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        # argmin |Xc T - Yc|^2 + lam |T - I|^2  =>  (Xc'Xc + lam I) T = Xc'Yc + lam I
        t = torch.linalg.solve(xtx + lam * eye, xc.T @ yc + lam * eye)               # (D, D): h @ T
        bias = y_mean - x_mean @ t
        op = nn.Linear(d, d, bias=True).to(device=h_in.device, dtype=h_in.dtype).requires_grad_(False)
        op.weight.copy_(t.T)                                                         # nn.Linear computes h @ W.T
        op.bias.copy_(bias)
        return op

    def _fits_bypass(self, depth: int) -> bool:
        """Whether the layer first dropped at `depth` gets a fitted map."""
        return self.config.bypass and depth >= self.config.bypass_min_depth

    # ---- orders -----------------------------------------------------------------------
    def _forward(self, keep: list[bool], bypass: dict[int, nn.Module]) -> tuple[list[torch.Tensor], torch.Tensor]:
        inputs: list[torch.Tensor] = []
        final = self.fwd.run_layers(self.h0, self.rope, self.batch, self.kv, 0, keep, bypass, inputs)
        return inputs, final

    def _try_drop(self, inputs: list[torch.Tensor], layer: int, keep: list[bool],
                  bypass: dict[int, nn.Module], op: nn.Module | None) -> float:
        keep2 = list(keep)
        keep2[layer] = False
        h = inputs[layer] if op is None else op(inputs[layer])
        return self.score(self.fwd.run_layers(h, self.rope, self.batch, self.kv, layer + 1, keep2, bypass))

    def greedy(self) -> tuple[list[int], dict[int, nn.Module], dict[int, float]]:
        n = self.num_layers
        keep, bypass, dropped, scores = [True] * n, {}, [], {n: 0.0}
        for step in range(n - 1):
            inputs, _ = self._forward(keep, bypass)
            best = None
            fit = self._fits_bypass(n - 1 - step)
            for layer in (i for i in range(n) if keep[i]):
                op = self.fit_bypass(layer, inputs[layer]) if fit else None
                s = self._try_drop(inputs, layer, keep, bypass, op)
                if best is None or s < best[1]:
                    best = (layer, s, op)
            layer, s, op = best
            if op is not None:
                plain = self._try_drop(inputs, layer, keep, bypass, None)
                if plain <= s:
                    op, s = None, plain
            keep[layer] = False
            if op is not None:
                bypass[layer] = op
            dropped.append(layer)
            scores[n - 1 - step] = s
        survivor = next(i for i in range(n) if keep[i])
        return [survivor] + dropped[::-1], bypass, scores

    def cos_order(self) -> list[int]:
        influence = []
        for layer in range(self.num_layers):
            a, b = self.full_states[layer][self.fit_mask], self.full_states[layer + 1][self.fit_mask]
            influence.append(1.0 - float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean()))
        return sorted(range(self.num_layers), key=lambda layer: -influence[layer])

    def along(self, order: list[int]) -> tuple[dict[int, nn.Module], dict[int, float]]:
        """Score (and, with bypass, fit) a given order depth by depth, deepest first."""
        n = self.num_layers
        keep, bypass, scores = [True] * n, {}, {n: 0.0}
        inputs, _ = self._forward(keep, bypass)
        for depth in range(n - 1, 0, -1):
            layer = order[depth]
            op = self.fit_bypass(layer, inputs[layer]) if self._fits_bypass(depth) else None
            keep[layer] = False
            if op is not None:
                plain_inputs, plain_final = self._forward(keep, bypass)
                bypass[layer] = op
                inputs, final = self._forward(keep, bypass)
                plain, s = self.score(plain_final), self.score(final)
                if plain <= s:
                    del bypass[layer]
                    inputs, s = plain_inputs, plain
            else:
                inputs, final = self._forward(keep, bypass)
                s = self.score(final)
            scores[depth] = s
        return bypass, scores

    def serving_score(self, scores: dict[int, float]) -> float:
        low = math.ceil(self.config.score_min_fraction * self.num_layers)
        depths = [d for d in scores if low <= d < self.num_layers] or [d for d in scores if d < self.num_layers]
        return sum(scores[d] for d in depths) / max(1, len(depths))

    def run(self) -> CalibrationResult:
        t0 = time.perf_counter()
        cfg = self.config
        existing = self.model.plan
        candidates: dict[str, tuple[list[int], dict[int, nn.Module], dict[int, float]]] = {}
        if not cfg.keep_order:
            if cfg.method is CalibMethod.GREEDY:
                candidates["measured"] = self.greedy()
            elif cfg.bypass or cfg.compare_existing:
                order = self.cos_order()
                candidates["measured"] = (order, *self.along(order))
            else:  # the one-pass ranking, unscored: the fast option
                candidates["measured"] = (self.cos_order(), {}, {})
        if cfg.keep_order or cfg.compare_existing:
            candidates["existing"] = (list(existing.layer_order), *self.along(existing.layer_order))
        means = {name: self.serving_score(c[2]) for name, c in candidates.items()}
        chosen = min(means, key=lambda name: (means[name], name != "measured"))
        order, bypass, scores = candidates[chosen]
        tag = f"{cfg.method}-{cfg.metric}" if cfg.method is CalibMethod.GREEDY else "cos"
        source = (f"calibrated:{tag}{'+bypass' if bypass else ''}" if chosen == "measured"
                  else f"{existing.source.removesuffix('+bypass')}{'+bypass' if bypass else ''}")
        plan = DepthPlan(self.num_layers, order, source=source,
                         bypass={layer: (op.weight.detach().float().cpu(), op.bias.detach().float().cpu())
                                 for layer, op in bypass.items()})
        return CalibrationResult(plan, scores, means, chosen, time.perf_counter() - t0)


def measure(config: CalibrateConfig) -> tuple[CalibrationResult, str]:
    """Load the model and measure its order (and bypass maps); returns (result, the model's plan folder)."""
    from adadepth.training.sequence_forward import load_engine_model

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    if config.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # calibration ranks layers; TF32 is plenty
    model, tokenizer, resolved = load_engine_model(config.model, config.cache_dir, config.device, config.dtype)
    sequences = calibration_sequences(tokenizer, config.data_dir, config.num_prompts, config.seq_len)
    return Calibrator(model, sequences, config).run(), resolved.plan_dir


def run_calibration(config: CalibrateConfig) -> CalibrationResult:
    """Measure and store the plan with the model (or in --output)."""
    result, plan_dir = measure(config)
    result.plan.save(config.output or output_dir_for(plan_dir, config.cache_dir))
    return result
