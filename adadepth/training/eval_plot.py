"""Quality-versus-depth plot: one line per model for agreement, KL and exact match."""
from __future__ import annotations

import os


def plot_reports(reports: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    metrics = (("agreement", "agreement with full depth"), ("kl", "KL(full || depth)"),
               ("exact_match_32", "exact match, first 32 tokens"))
    for ax, (key, title) in zip(axes, metrics):
        for rep in reports:
            pts = [(r["depth"], r[key]) for r in rep["results"] if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=os.path.basename(os.path.normpath(rep["model"])))
        ax.set_xlabel("depth (layers)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
