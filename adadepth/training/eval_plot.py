"""Quality-versus-depth plot. Top row, teacher-forced (one line per model): agreement, KL and
exact match. Bottom row, free-running (each depth's own text): the full-depth model's perplexity
of it, its repeated 4-gram share and distinct-2; solid lines plain greedy, dashed with penalties."""
from __future__ import annotations

import os


def _name(rep: dict) -> str:
    return os.path.basename(os.path.normpath(rep["model"]))


def plot_reports(reports: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    free = any(rep.get("free_running") for rep in reports)
    fig, grid = plt.subplots(2 if free else 1, 3, figsize=(15, 8.4 if free else 4.2), squeeze=False)
    metrics = (("agreement", "agreement with full depth"), ("kl", "KL(full || depth)"),
               ("exact_match_32", "exact match, first 32 tokens"))
    for ax, (key, title) in zip(grid[0], metrics):
        for rep in reports:
            pts = [(r["depth"], r[key]) for r in rep["results"] if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=_name(rep))
        ax.set_title(title)
    grid[0][0].legend()
    if free:
        free_metrics = (("perplexity_full", "free-running: full-depth perplexity of depth-d text"),
                        ("repeated_4gram_share", "free-running: repeated 4-gram share"),
                        ("distinct_2", "free-running: distinct-2"))
        for ax, (key, title) in zip(grid[1], free_metrics):
            for m, rep in enumerate(reports):
                for v, variant in enumerate(rep.get("free_running", [])):
                    pts = [(r["depth"], r[key]) for r in variant["results"] if r[key] is not None]
                    label = _name(rep) + (", " + ", ".join(f"{k}={x}" for k, x in variant["params"].items())
                                          if variant["params"] else "")
                    if pts:
                        ax.plot(*zip(*pts), marker="o" if v == 0 else ".", linestyle="-" if v == 0 else "--",
                                color=f"C{m * 5 + v}", label=label)
            ax.set_title(title, fontsize=10)
        grid[1][0].set_yscale("log")
        grid[1][1].legend(fontsize=7)
    for ax in grid.flat:
        ax.set_xlabel("depth (layers)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
