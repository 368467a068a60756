"""Does a prompt's *own* text tell how well it skips layers? A probe for the router (#5).

The router's label for a prompt is the agreement, on the full model's greedy continuation, of the
depth-d model with the full one. Here the same comparison is made teacher-forced on the prompt's
own tokens instead (after the chat template's shared prefix): the share of prompt positions whose
depth-d argmax is the full-depth argmax, and the mean KL(full || depth d) there. If those
predicted the continuation's agreement, a router could buy them with one reduced-depth prefill.
The probe reports their Pearson correlation with the labels, per grid depth, beside the prompt
length's. No predictor is fitted: a correlation near zero already rules the feature out.

    python benchmarks/router_prompt_probe.py --json benchmarks/results/router_prompt_probe.json \
        --plot benchmarks/results/router_prompt_probe.png
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

from adadepth.benchmarks.machine import machine_info
from adadepth.benchmarks.router_feature_study import corr
from adadepth.router.label_store import LabelStore

ARTIFACT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "adadepth", "artifacts", "smollm2-135m-sd")


def shared_prefix_len(token_ids: list[list[int]]) -> int:
    """Tokens every prompt starts with (the chat template's system turn): not the prompt's own text.
    At most the shortest prompt's length minus one, so every prompt keeps a position to score."""
    limit = min(len(ids) for ids in token_ids) - 1
    n = 0
    while n < limit and all(ids[n] == token_ids[0][n] for ids in token_ids):
        n += 1
    return n


def prompt_scores(llm, records, depths: list[int], batch_size: int = 16) -> tuple[list[dict], int]:
    """Per record, per depth: the `DepthScore` of its prompt positions past the shared prefix."""
    from adadepth.training.depth_scorer import DepthScore, DepthScorer

    ids = [r.prompt_token_ids for r in records]
    start = shared_prefix_len(ids)
    scores = [{d: DepthScore() for d in depths} for _ in records]
    DepthScorer(llm, depths, batch_size).agreement_and_kl(scores, [(i, x, start) for i, x in enumerate(ids)])
    return scores, start


def plot_correlations(report: dict, path: str) -> None:
    """Correlation with the label per grid depth: one line per feature, zero marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["correlations"]
    depths = [r["depth"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, name in (("r_prompt_agreement", "prompt's own agreement at depth d"),
                      ("r_prompt_kl", "prompt's own KL(full || depth d)"), ("r_log_prompt_tokens", "log prompt length")):
        ax.plot(depths, [r[key] for r in rows], marker="o", label=name)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylim(-1, 1)
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("Pearson r with the continuation's agreement")
    ax.set_title(f"Prompt-side features vs router labels ({report['num_prompts']} prompts)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--labels", default=os.path.join(ARTIFACT, "router_heldout_labels.jsonl"))
    ap.add_argument("--model", default="default")
    ap.add_argument("--cache-dir", default=None, help="adadepth's model cache (default: its usual one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default=None, help="PNG of the correlations per depth")
    args = ap.parse_args(argv)
    from adadepth import LLM

    meta, records = LabelStore(args.labels).read()
    records = [r for r in records if r.positions > 0]
    depths = [d for d in meta["depth_grid"] if d < meta["num_layers"]]
    llm = LLM(args.model, **({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    t0 = time.perf_counter()
    scores, start = prompt_scores(llm, records, depths)
    seconds = time.perf_counter() - t0
    length = [math.log(len(r.prompt_token_ids)) for r in records]
    rows = []
    for d in depths:
        label = [r.agreement(d) for r in records]
        rows.append({"depth": d,
                     "r_prompt_agreement": round(corr([s[d].agreement for s in scores], label), 3),
                     "r_prompt_kl": round(corr([s[d].kl_sum / s[d].positions for s in scores], label), 3),
                     "r_log_prompt_tokens": round(corr(length, label), 3),
                     "mean_prompt_agreement": round(sum(s[d].agreement for s in scores) / len(scores), 4),
                     "mean_label": round(sum(label) / len(label), 4)})
        print(f"depth {d}: r(prompt agreement, label) {rows[-1]['r_prompt_agreement']:+.3f}  "
              f"r(prompt KL, label) {rows[-1]['r_prompt_kl']:+.3f}  r(log length, label) "
              f"{rows[-1]['r_log_prompt_tokens']:+.3f}", flush=True)
    report = {"machine": machine_info(), "model": args.model, "labels": args.labels,
              "weights_fingerprint": meta.get("weights_fingerprint"), "num_prompts": len(records),
              "shared_prefix_tokens": start, "scored_prompt_positions": sum(s[depths[0]].positions for s in scores),
              "seconds": round(seconds, 1), "correlations": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot_correlations(report, args.plot)
    return report


if __name__ == "__main__":
    main()
