"""Router evaluation figure: agreement vs mean depth (router points on the fixed-depth curve),
and predicted vs realized agreement per requested quality."""
from __future__ import annotations

import os


def plot_router_eval(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, cal) = plt.subplots(1, 2, figsize=(12, 4.5))
    fixed = report["results"]
    ax.plot([r["depth"] for r in fixed], [r["agreement"] for r in fixed], marker="o", color="tab:gray",
            label="fixed depth")
    from adadepth.router.policy_sweep import mixed_fixed_depth

    lo, hi = fixed[0]["depth"], fixed[-1]["depth"]
    xs = [lo + (hi - lo) * i / 100 for i in range(101)]
    ax.plot(xs, [mixed_fixed_depth(fixed, x) for x in xs], linestyle=":", color="tab:gray",
            label="two fixed depths mixed (hull)")
    routed = report["router"]
    ax.plot([r["mean_depth"] for r in routed], [r["agreement"] for r in routed], marker="s", color="tab:blue",
            label="router (mean depth)")
    for r in routed:
        ax.annotate(f"q={r['quality']:g}", (r["mean_depth"], r["agreement"]), textcoords="offset points",
                    xytext=(4, -10), fontsize=7, color="tab:blue")
    if report.get("oracle"):
        ax.plot([r["mean_depth"] for r in report["oracle"]], [r["agreement"] for r in report["oracle"]],
                linestyle="--", color="tab:green", alpha=0.6, label="oracle (true per-prompt agreement)")
    if report.get("split_half_oracle"):
        half = report["split_half_oracle"]
        ax.plot([r["mean_depth"] for r in half], [r["agreement"] for r in half], linestyle="-.", color="tab:olive",
                alpha=0.8, label="split-half oracle (decides on other positions)")
    if report.get("calibrated_split_half_oracle"):
        half = report["calibrated_split_half_oracle"]
        ax.plot([r["mean_depth"] for r in half], [r["agreement"] for r in half], marker="^", linestyle="-.",
                color="tab:purple", alpha=0.8, label="split-half oracle, calibrated")
    ax.set_xlabel("mean depth (layers)")
    ax.set_ylabel("agreement with full depth")
    ax.set_title(f"{os.path.basename(os.path.normpath(report['model']))}: held-out prompts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)

    qs = [r["quality"] for r in routed]
    cal.plot(qs, [r["predicted_agreement"] for r in routed], marker="o", label="mean predicted")
    cal.plot(qs, [r["agreement"] for r in routed], marker="s", label="realized (pooled)")
    cal.plot(qs, qs, linestyle=":", color="black", alpha=0.5, label="requested quality")
    cal.set_xlabel("requested quality q")
    cal.set_ylabel("agreement")
    cal.set_title("calibration")
    cal.grid(alpha=0.3)
    cal.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
