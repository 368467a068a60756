"""What a router's policy does on labelled prompts, for a sweep of requested qualities.

For each quality q every prompt gets the depth the router would give it (smallest grid depth
with predicted agreement >= q); its realized agreement is then read from its labels at that
depth. Agreement is pooled over positions, as `adadepth eval` pools it, so the fixed-depth
curve (`fixed_depth_curve`) and the router's points are directly comparable.
"""
from __future__ import annotations

import numpy as np
import torch

from adadepth.router.depth_grid import DepthGrid
from adadepth.router.label_store import LabelRecord

DEFAULT_QUALITIES = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def fixed_depth_curve(records: list[LabelRecord], grid: DepthGrid) -> list[dict]:
    positions = sum(r.positions for r in records)
    return [{"depth": d, "agreement": round(sum(r.matches[d] for r in records) / positions, 5),
             "num_prompts": len(records), "num_positions": positions} for d in grid.depths]


def interpolate(curve: list[dict], depth: float) -> float:
    """Agreement of the fixed-depth curve at a (fractional) mean depth, linearly interpolated."""
    pts = sorted((c["depth"], c["agreement"]) for c in curve)
    if depth <= pts[0][0]:
        return pts[0][1]
    for (d0, a0), (d1, a1) in zip(pts, pts[1:]):
        if depth <= d1:
            return a0 + (a1 - a0) * (depth - d0) / (d1 - d0)
    return pts[-1][1]


def mixed_fixed_depth(curve: list[dict], depth: float) -> float:
    """Best agreement at a mean depth that a router-free server gets by sending a share of the
    requests to one fixed depth and the rest to another: the upper concave hull of the
    fixed-depth points. The curve can be convex (agreement jumps to 1 at full depth), so a
    blind mix of two depths can beat the interpolated curve; this is the stricter baseline."""
    pts = sorted((c["depth"], c["agreement"]) for c in curve)
    hull: list[tuple[float, float]] = []
    for p in pts:
        # Pop while the last hull point lies on or below the chord from its predecessor to p.
        while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                  - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) >= 0:
            hull.pop()
        hull.append(p)
    return interpolate([{"depth": d, "agreement": a} for d, a in hull], depth)


def sweep_policy(predicted: torch.Tensor, records: list[LabelRecord], grid: DepthGrid,
                 qualities=DEFAULT_QUALITIES) -> list[dict]:
    """predicted: (n, len(grid)) router predictions for `records` (full-depth column = 1)."""
    curve = fixed_depth_curve(records, grid)
    positions = sum(r.positions for r in records)
    rows = predicted.tolist()
    out = []
    for q in qualities:
        depths, preds = [], []
        for row in rows:
            index = next((j for j, a in enumerate(row) if a >= q), len(grid.depths) - 1)
            depths.append(grid.depths[index])
            preds.append(row[index] if index < len(grid.depths) - 1 else 1.0)
        matches = sum(r.matches[d] for r, d in zip(records, depths))
        mean_depth = sum(depths) / len(depths)
        # Compute-weighted depth: prompt + continuation tokens x layers, as the engine counts work.
        tokens = [len(r.prompt_token_ids) + r.positions for r in records]
        weighted_depth = sum(t * d for t, d in zip(tokens, depths)) / sum(tokens)
        agreement = matches / positions
        fixed = interpolate(curve, mean_depth)
        fixed_weighted = interpolate(curve, weighted_depth)
        mixed = mixed_fixed_depth(curve, mean_depth)
        out.append({
            "quality": q,
            "mean_depth": round(mean_depth, 3),
            "agreement": round(agreement, 5),
            "predicted_agreement": round(sum(preds) / len(preds), 5),
            "calibration_error": round(sum(preds) / len(preds) - agreement, 5),
            "prompt_mean_agreement": round(sum(r.agreement(d) for r, d in zip(records, depths)) / len(records), 5),
            "fixed_depth_agreement_at_mean_depth": round(fixed, 5),
            "gain_vs_fixed": round(agreement - fixed, 5),
            "mixed_fixed_depths_agreement_at_mean_depth": round(mixed, 5),
            "gain_vs_mixed_fixed_depths": round(agreement - mixed, 5),
            "token_weighted_mean_depth": round(weighted_depth, 3),
            "gain_vs_fixed_token_weighted": round(agreement - fixed_weighted, 5),
            "depth_counts": {str(d): depths.count(d) for d in grid.depths},
        })
    return out


def oracle_sweep(records: list[LabelRecord], grid: DepthGrid, qualities=DEFAULT_QUALITIES) -> list[dict]:
    """The same policy with each prompt's true agreement as its prediction: an upper bound for
    a per-prompt threshold policy."""
    truth = torch.tensor([[r.agreement(d) for d in grid.depths[:-1]] + [1.0] for r in records])
    # True agreement is not monotone in depth; the policy takes the first depth reaching q anyway.
    return [{k: v for k, v in row.items() if k not in ("predicted_agreement", "calibration_error")}
            for row in sweep_policy(truth, records, grid, qualities)]


def _half_records(records: list[LabelRecord], grid: DepthGrid, parity: int) -> list[LabelRecord]:
    """The records scored on their even (0) or odd (1) continuation positions only."""
    out = []
    for r in records:
        halves = {d: r.half(d, parity) for d in grid.depths}
        out.append(LabelRecord(r.id, r.messages, r.prompt_token_ids, halves[grid.depths[0]][1],
                               {d: m for d, (m, _) in halves.items()}))
    return out


def _split_half_runs(records: list[LabelRecord], grid: DepthGrid, qualities, predict) -> list[dict]:
    """The policy deciding on one half of each continuation's positions and scored on the other
    (even -> odd and odd -> even, averaged). predict(decide, score) -> (n, len(grid)) predictions
    from the deciding half's (n, len(grid) - 1) agreements; `score` is only there to fit on."""
    usable = [r for r in records if r.positions >= 2]
    if not usable or any(not r.match_bits for r in usable):
        raise ValueError("split-half oracles need records with match_bits (label format 2)")
    def truth(rs: list[LabelRecord]) -> torch.Tensor:                               # (n, len(grid) - 1)
        return torch.tensor([[r.agreement(d) for d in grid.depths[:-1]] for r in rs], dtype=torch.float64)

    runs = []
    for parity in (0, 1):
        decide, score = _half_records(usable, grid, parity), _half_records(usable, grid, 1 - parity)
        partial = predict(truth(decide), truth(score))
        runs.append(sweep_policy(torch.cat([partial, torch.ones(len(usable), 1, dtype=partial.dtype)], 1),
                                 score, grid, qualities))
    keys = [k for k, v in runs[0][0].items() if isinstance(v, float) and k != "quality"]
    return [{"quality": a["quality"], **{k: round((a[k] + b[k]) / 2, 5) for k in keys}} for a, b in zip(*runs)]


def split_half_oracle(records: list[LabelRecord], grid: DepthGrid, qualities=DEFAULT_QUALITIES) -> list[dict]:
    """The policy with each prompt's agreement on HALF its positions as the prediction, scored on
    the other half (even -> odd and odd -> even, averaged).

    The oracle of `oracle_sweep` sees the very positions it is scored on, so it also profits from
    the luck of each prompt's 64 tokens, which no router can know. Here the decision and the score
    come from disjoint positions of the same continuation: what a router could reach if it knew
    each prompt's agreement as well as 32 of its own positions tell it (far more than any prefill
    feature does). Records need `match_bits`; prompts with fewer than 2 positions are left out.
    """
    rows = _split_half_runs(records, grid, qualities, lambda decide, score: decide)
    keys = ("mean_depth", "agreement", "fixed_depth_agreement_at_mean_depth", "gain_vs_fixed",
            "mixed_fixed_depths_agreement_at_mean_depth", "gain_vs_mixed_fixed_depths")
    return [{"quality": r["quality"], **{k: r[k] for k in keys}} for r in rows]


def isotonic_fit(x: np.ndarray, y: np.ndarray):
    """The non-decreasing least-squares fit of y on x (pool adjacent violators over x's distinct
    values, ties pooled first), as a function that interpolates linearly between those values and
    is flat outside them. Agreements are fractions of a few positions, so ties are the rule."""
    ux, inv = np.unique(x, return_inverse=True)
    weights = np.bincount(inv).astype(np.float64)
    means = np.bincount(inv, weights=y) / weights
    blocks: list[list[float]] = []                                   # [value, weight, distinct x's]
    for m, w in zip(means, weights):
        blocks.append([m, w, 1])
        while len(blocks) > 1 and blocks[-2][0] >= blocks[-1][0]:
            m2, w2, n2 = blocks.pop()
            m1, w1, n1 = blocks[-1]
            blocks[-1] = [(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
    fitted = np.repeat([b[0] for b in blocks], [b[2] for b in blocks])   # one value per distinct x
    return lambda z: np.interp(z, ux, fitted)


def calibrated_half_predictions(decide: torch.Tensor, score: torch.Tensor, folds: int = 5) -> torch.Tensor:
    """decide, score: (n, D) agreements on the two halves. Per depth, the isotonic map from the
    deciding half's agreement to the scored half's, fitted on the other folds' prompts
    (cross-fitting, so no prompt's prediction has seen its own score), then made monotone in
    depth as a router's predictions are. Isotonic because it assumes only that more agreement on
    one half means no less on the other. (On the shipped held-out labels a line, a quadratic
    and 5 or 10 bins gave +0.021..+0.022 over fixed depth at q = 0.8 and +0.009..+0.018 at
    q = 0.9; the isotonic map +0.022 / +0.017.)"""
    x_all, y_all = decide.double().numpy(), score.double().numpy()
    n = x_all.shape[0]
    fold = np.arange(n) % folds
    out = np.empty_like(x_all)                                                     # (n, D)
    for f in range(folds):
        fit, held = fold != f, fold == f
        if not held.any():
            continue
        for j in range(x_all.shape[1]):
            out[held, j] = isotonic_fit(x_all[fit, j], y_all[fit, j])(x_all[held, j])
    return torch.cummax(torch.from_numpy(out).clamp(0, 1), dim=1).values


def calibrated_split_half_oracle(records: list[LabelRecord], grid: DepthGrid, qualities=DEFAULT_QUALITIES,
                                 folds: int = 5) -> list[dict]:
    """The split-half oracle held to the router's own standard: calibrated predictions.

    The raw half-agreement is an over-confident prediction (its luck does not repeat on the other
    half), so `split_half_oracle` spreads prompts over depths more than a calibrated router can.
    Mapped through `calibrated_half_predictions`, the same knowledge of each prompt (32 of its own
    positions) becomes what a calibrated router with that much skill would do: the ceiling, for
    the threshold policy, of any predictor no better than that.
    """
    return _split_half_runs(records, grid, qualities,
                            lambda decide, score: calibrated_half_predictions(decide, score, folds))


def sharpen(predicted: torch.Tensor, factor: float) -> torch.Tensor:
    """predicted: (n, len(grid)), full-depth column = 1. Each partial depth's deviations from its
    mean over the prompts scaled by `factor`, clipped to [0, 1] and kept monotone in depth. The
    mean prediction is kept, so calibration on average can survive; the prompts spread over more
    depths. A counterfactual: how much of a gain over the interpolated curve spread alone buys."""
    partial = predicted[:, :-1]
    sharp = (partial.mean(0) + factor * (partial - partial.mean(0))).clamp(0, 1)  # (n, len(grid) - 1)
    return torch.cat([torch.cummax(sharp, dim=1).values, predicted[:, -1:]], 1)


def split_half_reliability(records: list[LabelRecord], grid: DepthGrid, min_half: int = 16) -> dict[str, dict]:
    """Per partial depth: the correlation across prompts of agreement on even vs odd positions
    (prompts with >= min_half positions in each half), and the Spearman-Brown reliability of a
    whole continuation's agreement, 2r / (1 + r): the share of the variance of prompts' labels
    that belongs to the prompts rather than to their tokens' luck, i.e. the most any
    predictor's R^2 against these labels can be."""
    usable = [r for r in records if r.match_bits and r.positions >= 2 * min_half]
    out: dict[str, dict] = {}
    if len(usable) < 3:
        return out
    for d in grid.depths[:-1]:
        even = torch.tensor([m / n for m, n in (r.half(d, 0) for r in usable)], dtype=torch.float64)
        odd = torch.tensor([m / n for m, n in (r.half(d, 1) for r in usable)], dtype=torch.float64)
        if even.std() == 0 or odd.std() == 0:
            continue
        r = float(torch.corrcoef(torch.stack([even, odd]))[0, 1])
        out[str(d)] = {"num_prompts": len(usable), "half_correlation": round(r, 4),
                       "reliability": round(2 * r / (1 + r), 4) if r > -1 else None}
    return out
