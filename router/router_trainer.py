"""`adadepth router train`: fit the agreement predictor on labelled calibration prompts.

Features come from the model's own prefill layers (`FeatureExtractor`, the same computation the
engine runs before routing). The labelled prompts are split (by a hash of their id) into a fit
and a validation part; the number of epochs is chosen by the validation loss, then the
predictor is refitted on all labelled prompts for that many epochs and saved as `router.json` +
`router.safetensors` (beside the model's depth plan unless --output says otherwise).
Prompts of the held-out evaluation split are refused, so evaluation never sees training data.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from adadepth.config import ModelConfig, output_dir_for
from adadepth.router.agreement_predictor import AgreementPredictor, PredictorShape, weighted_bce
from adadepth.router.depth_grid import DepthGrid
from adadepth.router.difficulty_router import DifficultyRouter
from adadepth.router.feature_extractor import FeatureExtractor
from adadepth.router.label_store import LabelRecord, LabelStore
from adadepth.router.labeler import LABELS_FILE
from adadepth.router.policy_sweep import sweep_policy
from adadepth.router.prefill_features import PrefillFeatures

logger = logging.getLogger(__name__)


@dataclass
class RouterTrainConfig:
    labels: str = field(default="", metadata={"help": f"labels JSONL (default: {LABELS_FILE} in the model's plan folder; for a model inside the installed package, in the cache folder's outputs/)"})
    output: str = field(default="", metadata={"help": "folder for router.json/router.safetensors (default: the model's plan folder, or the cache folder's outputs/ for a model inside the installed package)"})
    feature_layers: int = field(default=-1, metadata={
        "help": "k: features after layers 0..k-1 (all must run at the smallest grid depth); -1: the largest such k"})
    pca_dims: int = field(default=32, metadata={"help": "PCA dimensions of the pooled hidden state"})
    hidden_size: int = field(default=32, metadata={"help": "hidden units of the predictor head (0: linear)"})
    max_epochs: int = field(default=3000, metadata={"help": "most full-batch optimizer steps"})
    lr: float = field(default=3e-3, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    val_fraction: float = field(default=0.2, metadata={"help": "labelled prompts held back to pick the epoch count"})
    seed: int = field(default=0, metadata={"help": "initialization seed"})
    batch_size: int = field(default=16, metadata={"help": "prompts per feature-extraction pass"})

    def __post_init__(self) -> None:
        if self.pca_dims < 1 or self.hidden_size < 0 or self.max_epochs < 1 or self.batch_size < 1:
            raise ValueError("pca_dims, max_epochs and batch_size must be >= 1, hidden_size >= 0")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError("lr must be > 0 and weight_decay >= 0")


def is_validation(record_id: str, fraction: float) -> bool:
    return int(hashlib.sha1(("val:" + record_id).encode()).hexdigest()[:8], 16) % 1000 < fraction * 1000


def check_not_heldout(records: list[LabelRecord]) -> None:
    from adadepth.training.data import Split, split_of

    bad = [r.id for r in records if split_of(r.user_text) is Split.HELDOUT]
    if bad:
        raise ValueError(f"{len(bad)} labelled prompts belong to the held-out evaluation split (e.g. {bad[0]}); "
                         "label the calib split instead (`adadepth router label` without --prompts)")


def targets(records: list[LabelRecord], grid: DepthGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, G) agreement at the partial grid depths and (n,) weights (positions, mean 1)."""
    y = torch.tensor([[r.agreement(d) for d in grid.partial] for r in records], dtype=torch.float32)
    w = torch.tensor([float(r.positions) for r in records])
    return y, w / w.mean()


def fit(predictor: AgreementPredictor, feats: PrefillFeatures, y: torch.Tensor, w: torch.Tensor,
        config: RouterTrainConfig, epochs: int, val: tuple[PrefillFeatures, torch.Tensor, torch.Tensor] | None = None
        ) -> tuple[int, float]:
    """Train the head for `epochs` steps; with `val`, keep the best-validation weights.
    Returns (best epoch, best validation loss) (epochs, nan without val)."""
    predictor.fit_inputs(feats)
    torch.manual_seed(config.seed)
    for p in predictor.head.parameters():  # re-initialize: fit() may be called twice on one predictor
        if p.dim() == 2:
            torch.nn.init.kaiming_uniform_(p, a=5 ** 0.5)
        else:
            torch.nn.init.zeros_(p)
    opt = torch.optim.AdamW(predictor.head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    best = (epochs, float("nan"))
    best_state = None
    for epoch in range(1, epochs + 1):
        predictor.train()
        opt.zero_grad()
        loss = weighted_bce(predictor(feats), y, w)
        loss.backward()
        opt.step()
        if val is not None:
            predictor.eval()
            with torch.no_grad():
                v = float(weighted_bce(predictor(val[0]), val[1], val[2]))
            if best_state is None or v < best[1]:
                best, best_state = (epoch, v), {k: t.clone() for k, t in predictor.head.state_dict().items()}
    if best_state is not None:
        predictor.head.load_state_dict(best_state)
    predictor.eval()
    return best


def train_router(model: ModelConfig, config: RouterTrainConfig) -> dict:
    from adadepth.router.labeler import plan_dir_of
    from adadepth.training.sequence_forward import load_engine_model

    t0 = time.perf_counter()
    if model.num_threads:
        torch.set_num_threads(model.num_threads)
    plan_dir = plan_dir_of(model)
    # Default labels: those `router label` wrote (outside the package), else the ones shipped beside the order.
    written = os.path.join(output_dir_for(plan_dir, model.cache_dir), LABELS_FILE)
    labels_path = config.labels or (written if os.path.exists(written) else os.path.join(plan_dir, LABELS_FILE))
    meta, records = LabelStore(labels_path).read()
    net, _, _ = load_engine_model(model.model, model.cache_dir, model.device, model.dtype)
    plan = net.plan
    if meta["num_layers"] != plan.num_layers or meta["layer_order_fingerprint"] != plan.fingerprint():
        raise ValueError(f"{labels_path} was labelled for layer order [{meta['layer_order_fingerprint']}], "
                         f"the model's is [{plan.fingerprint()}]: relabel (`adadepth router label`)")
    from adadepth.router.labeler import weights_fingerprint

    fingerprint = weights_fingerprint(net)
    if meta.get("weights_fingerprint", fingerprint) != fingerprint:  # older label files lack it
        raise ValueError(f"{labels_path} was labelled with other weights than {model.model}'s (retrained?): "
                         "relabel (`adadepth router label --no-resume`)")
    check_not_heldout(records)
    records = [r for r in records if r.positions > 0]
    if len(records) < 10:
        raise ValueError(f"{labels_path} holds {len(records)} usable labelled prompts; label more (>= 10)")
    grid = DepthGrid(tuple(meta["depth_grid"]), plan.num_layers)
    k = grid.max_feature_layers(plan) if config.feature_layers < 0 else config.feature_layers
    grid.check_feature_layers(plan, k)

    feats = FeatureExtractor(net, k, config.batch_size).extract([r.prompt_token_ids for r in records])
    y, w = targets(records, grid)
    val_mask = torch.tensor([is_validation(r.id, config.val_fraction) for r in records])
    fit_idx, val_idx = (~val_mask).nonzero().flatten(), val_mask.nonzero().flatten()
    if len(val_idx) == 0 or len(fit_idx) < 2:
        raise ValueError("too few labelled prompts to hold some back for validation")
    shape = PredictorShape(feats.pooled.shape[1], min(config.pca_dims, len(fit_idx) - 1), config.hidden_size,
                           len(grid.partial))

    # 1) pick the epoch count on the validation part
    probe = AgreementPredictor(shape)
    best_epoch, val_loss = fit(probe, feats.select(fit_idx), y[fit_idx], w[fit_idx], config, config.max_epochs,
                               val=(feats.select(val_idx), y[val_idx], w[val_idx]))
    # Platt scaling on the held-back prompts (the probe never trained on them).
    probe.fit_calibration(feats.select(val_idx), y[val_idx], w[val_idx])
    calibration = (float(probe.calib_scale), float(probe.calib_bias))
    val_records = [records[i] for i in val_idx.tolist()]
    probe_router = DifficultyRouter(probe, grid, k, plan.fingerprint())
    val_pred = probe_router.predict(feats.select(val_idx))
    val_mae = (val_pred[:, :-1] - y[val_idx]).abs().mean(0).tolist()
    val_sweep = sweep_policy(val_pred, val_records, grid)

    # 2) refit on everything for that many epochs
    predictor = AgreementPredictor(shape)
    fit(predictor, feats, y, w, config, best_epoch)
    with torch.no_grad():
        predictor.calib_scale.fill_(calibration[0])
        predictor.calib_bias.fill_(calibration[1])
        train_loss = float(weighted_bce(predictor(feats), y, w))
    info = {
        "model": model.model, "labels": os.path.abspath(labels_path), "label_meta": meta,
        "num_prompts": len(records), "num_validation_prompts": len(val_idx), "epochs": best_epoch,
        "validation_loss": round(val_loss, 5), "train_loss": round(train_loss, 5),
        "validation_mae_by_depth": {str(d): round(m, 4) for d, m in zip(grid.partial, val_mae)},
        "platt_scaling": {"a": round(calibration[0], 4), "b": round(calibration[1], 4)},
        "validation_policy": val_sweep, "config": {**config.__dict__},
    }
    router = DifficultyRouter(predictor, grid, k, plan.fingerprint(), info)
    output = config.output or output_dir_for(plan_dir, model.cache_dir)
    router.save(output)
    return {"router": output, "feature_layers": k, "depth_grid": list(grid.depths), "num_prompts": len(records),
            "epochs": best_epoch, "validation_loss": round(val_loss, 5), "platt_scaling": info["platt_scaling"],
            "num_trained_parameters": predictor.num_trained_parameters,
            "validation_mae_by_depth": info["validation_mae_by_depth"],
            "validation_policy": [{k2: row[k2] for k2 in ("quality", "mean_depth", "agreement", "predicted_agreement",
                                                          "gain_vs_fixed")} for row in val_sweep],
            "seconds": round(time.perf_counter() - t0, 1)}
