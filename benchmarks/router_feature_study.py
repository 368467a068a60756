"""Would other prefill features route better? A study on the router's existing labels (#5).

The shipped router reads the residual stream after the first 3 layers (mean + last token,
pooled) and the prompt length. Here the same labelled prompts (calib split for fitting,
held-out split for scoring) also get what a *full-depth* prefill would know before decoding:
the final hidden state (pooled the same way) and the full model's next-token distribution at
the last prompt token (entropy, top-1 probability, top-1 - top-2 margin). Each feature set
fits the same small ridge predictor (PCA of the hidden states, per-depth agreement, monotone
in depth), and the policy sweep scores it exactly as `adadepth router eval` does: realized
agreement minus the fixed-depth curve at the same mean depth.

    python benchmarks/router_feature_study.py --json benchmarks/results/router_feature_study.json \
        --plot benchmarks/results/router_feature_study.png
"""
from __future__ import annotations

import argparse
import json
import math
import os

import torch

from adadepth.router.label_store import LabelStore
from adadepth.router.policy_sweep import oracle_sweep, sweep_policy

ARTIFACT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "adadepth", "artifacts", "smollm2-135m-sd")
FEATURE_SETS = (("length",), ("confidence",), ("layers_0_2",), ("layers_0_2", "confidence"), ("final",),
                ("final", "confidence"), ("layers_0_2", "final", "confidence"))
QUALITIES = (0.7, 0.75, 0.8, 0.85, 0.9)


@torch.inference_mode()
def prompt_features(llm, records, feature_layers: int = 3, batch_size: int = 8) -> list[dict]:
    from adadepth.router.prefill_features import PrefillFeatures
    from adadepth.training.sequence_forward import SequenceBatch, SequenceForward

    model = llm.engine.model
    fwd = SequenceForward(model)
    out = []
    for start in range(0, len(records), batch_size):
        seqs = SequenceBatch.build([r.prompt_token_ids for r in records[start: start + batch_size]], fwd.device)
        batch = fwd.forward_batch(seqs, model.num_layers)
        kv = fwd.scratch_kv(seqs.input_ids.numel())
        early = model.run_layers(model.embed(batch), batch, kv, 0, feature_layers).clone()          # (B, T, D)
        final = model.run_layers(early.clone(), batch, kv, feature_layers, model.num_layers)       # (B, T, D)
        n = final.shape[0]
        logp = model.compute_logits(model.norm(final[torch.arange(n), seqs.lengths - 1])).log_softmax(-1)  # (B, V)
        top2 = logp.exp().topk(2, -1).values                                                       # (B, 2)
        pooled_early = PrefillFeatures.from_hidden(early, seqs.lengths).pooled
        pooled_final = PrefillFeatures.from_hidden(model.norm(final), seqs.lengths).pooled
        for i in range(n):
            out.append({"layers_0_2": pooled_early[i], "final": pooled_final[i], "length": float(seqs.lengths[i]),
                        "confidence": [float(-(logp[i].exp() * logp[i]).sum()), float(top2[i, 0]),
                                       float(top2[i, 0] - top2[i, 1])]})
    return out


def design(feats: list[dict], names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden-state columns for PCA, scalar columns): log length always among the scalars."""
    hidden = [torch.stack([f[n] for f in feats]) for n in names if n in ("layers_0_2", "final")]
    scalars = [[math.log(f["length"])] + (f["confidence"] if "confidence" in names else []) for f in feats]
    return (torch.cat(hidden, 1) if hidden else torch.zeros(len(feats), 0)), torch.tensor(scalars)


def fit_predict(fit_feats, fit_y, test_feats, names, pca_dims: int, ridge: float) -> torch.Tensor:
    """Ridge regression of per-depth agreement; returns (n_test, G) predictions, monotone in depth."""
    hc, sc = design(fit_feats, names)
    ht, st = design(test_feats, names)
    if hc.shape[1]:
        mu = hc.mean(0)
        _, _, v = torch.pca_lowrank(hc - mu, q=min(pca_dims, *hc.shape), center=False)
        zc, zt = torch.cat([(hc - mu) @ v, sc], 1), torch.cat([(ht - mu) @ v, st], 1)
    else:
        zc, zt = sc, st
    m, s = zc.mean(0), zc.std(0) + 1e-6
    zc = torch.cat([(zc - m) / s, torch.ones(len(zc), 1)], 1)
    zt = torch.cat([(zt - m) / s, torch.ones(len(zt), 1)], 1)
    w = torch.linalg.solve(zc.T @ zc + ridge * torch.eye(zc.shape[1]), zc.T @ fit_y)
    return torch.cummax((zt @ w).clamp(0, 1), 1).values


def corr(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a), torch.tensor(b)
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def plot_gains(report: dict, path: str) -> None:
    """Held-out gain over fixed depth per requested quality: one group of bars per feature set
    (its largest PCA size), the oracle last."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = {}
    for r in report["feature_sets"]:  # the largest PCA size of each set (the shipped router uses 32)
        best["+".join(r["features"])] = r["sweep"]
    groups = list(best.items()) + [("oracle", report["oracle"])]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(groups)
    for g, (name, sweep) in enumerate(groups):
        ax.bar([i + g * width for i in range(len(sweep))], [p["gain_vs_fixed"] for p in sweep], width, label=name)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(QUALITIES))], [f"q = {q:g}" for q in QUALITIES])
    ax.axhline(0.03, color="black", linestyle=":", linewidth=1, label="target +0.03")
    ax.set_ylabel("agreement gain over fixed depth (held-out)")
    ax.set_title(f"Router features: {report['num_fit_prompts']} calibration prompts, {report['num_test_prompts']} held-out")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    from adadepth.router.depth_grid import DepthGrid

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifact", default=ARTIFACT, help="folder with router_labels.jsonl + router_heldout_labels.jsonl")
    ap.add_argument("--model", default="default")
    ap.add_argument("--cache-dir", default=None, help="adadepth's model cache (default: its usual one)")
    ap.add_argument("--features-cache", default=None, help="reuse (or write) the extracted features here (.pt)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of the gains per feature set and quality")
    args = ap.parse_args(argv)
    torch.manual_seed(0)  # pca_lowrank is randomized
    meta, fit_records = LabelStore(os.path.join(args.artifact, "router_labels.jsonl")).read()
    _, test_records = LabelStore(os.path.join(args.artifact, "router_heldout_labels.jsonl")).read()
    fit_records = [r for r in fit_records if r.positions > 0]
    test_records = [r for r in test_records if r.positions > 0]
    grid = DepthGrid(tuple(meta["depth_grid"]), meta["num_layers"])
    if args.features_cache and os.path.exists(args.features_cache):
        cached = torch.load(args.features_cache)
        fit_feats, test_feats = cached["fit"], cached["test"]
    else:
        from adadepth import LLM

        llm = LLM(args.model, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
        fit_feats, test_feats = prompt_features(llm, fit_records), prompt_features(llm, test_records)
        if args.features_cache:
            torch.save({"fit": fit_feats, "test": test_feats}, args.features_cache)
    fit_y = torch.tensor([[r.agreement(d) for d in grid.partial] for r in fit_records])
    everyone, feats = fit_records + test_records, fit_feats + test_feats
    report = {"model": args.model, "labels": args.artifact, "num_fit_prompts": len(fit_records),
              "num_test_prompts": len(test_records), "depth_grid": list(grid.depths),
              "correlation_with_agreement": {
                  name: {str(d): round(corr([f["confidence"][i] if i >= 0 else math.log(f["length"]) for f in feats],
                                            [r.agreement(d) for r in everyone]), 3) for d in grid.partial}
                  for name, i in (("first_token_entropy", 0), ("first_token_top1", 1), ("first_token_margin", 2),
                                  ("log_prompt_tokens", -1))},
              "oracle": oracle_sweep(test_records, grid, QUALITIES), "feature_sets": []}
    for names in FEATURE_SETS:
        for pca_dims in ((8, 16, 32) if {"layers_0_2", "final"} & set(names) else (0,)):
            pred = fit_predict(fit_feats, fit_y, test_feats, names, max(pca_dims, 1), ridge=1.0)
            pred = torch.cat([pred, torch.ones(len(pred), 1)], 1)                    # full depth: agreement 1
            rows = sweep_policy(pred, test_records, grid, QUALITIES)
            report["feature_sets"].append({"features": list(names), "pca_dims": pca_dims, "sweep": [
                {k: r[k] for k in ("quality", "mean_depth", "agreement", "gain_vs_fixed")} for r in rows]})
            print(f"{'+'.join(names):34s} pca {pca_dims:2d}  " + "  ".join(
                f"q{r['quality']}: d {r['mean_depth']:.1f} gain {r['gain_vs_fixed']:+.4f}" for r in rows), flush=True)
    print("oracle gain: " + "  ".join(f"q{r['quality']}: {r['gain_vs_fixed']:+.4f}" for r in report["oracle"]))
    print("correlations: " + json.dumps(report["correlation_with_agreement"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot_gains(report, args.plot)
    return report


if __name__ == "__main__":
    main()
