"""The pictures lorahub-ray writes beside its outputs (matplotlib, Agg backend, no display needed):

* :func:`plot_search` — ``search.png`` of a search: best objective against evaluations for every
  restart, and the winning weights per module;
* :func:`plot_comparison` — ``comparison.png`` of ``lorahub-ray compare``: accuracy and input tokens
  per example for each arm.

matplotlib is imported inside each function: it is heavy and only needed when a picture is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib  # heavy, optional at import time of the package

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_search(path: Path, outcomes: Sequence, recipe) -> Path:
    """``outcomes``: :class:`~lorahub_ray.core.portfolio.RestartOutcome` of every restart; ``recipe``
    the winner's (its ``search["best_restart"]`` names it)."""
    plt = _pyplot()
    names = [m["name"] for m in recipe.modules]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, max(1, len(names) / 10)]})
    for o in outcomes:
        values = [e.objective for e in sorted(o.history, key=lambda e: e.step)]
        if values:
            left.plot(range(1, len(values) + 1), np.minimum.accumulate(values),
                      label=f"restart {o.restart} ({o.plan.optimizer}, seed {o.plan.seed})"
                      + ("" if o.finished else ", stopped"))
    left.set_xlabel("evaluations")
    left.set_ylabel("best objective")
    left.set_title("search progress")
    left.legend(fontsize="small")
    right.bar(range(len(names)), recipe.weights, color=["tab:blue" if w >= 0 else "tab:red" for w in recipe.weights])
    right.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
    right.axhline(0, color="black", linewidth=0.5)
    right.set_title(f"winning weights (restart {recipe.search.get('best_restart', 0)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_comparison(report: dict, path: Path) -> Path:
    """Two bar charts side by side: accuracy and input tokens per example, per arm."""
    plt = _pyplot()
    arms = list(report["arms"])
    colors = ["#9e9e9e", "#5c6bc0", "#ef6c00"][: len(arms)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    acc = [report["arms"][a]["accuracy"] for a in arms]
    tok = [report["arms"][a]["input_tokens_per_example"] for a in arms]
    ax1.bar(arms, acc, color=colors)
    ax1.set_ylabel("exact-match accuracy (%)")
    ax1.set_ylim(0, 100)
    ax2.bar(arms, tok, color=colors)
    ax2.set_ylabel("input tokens per example")
    for ax, values, fmt in ((ax1, acc, "{:.1f}"), (ax2, tok, "{:.0f}")):
        for i, v in enumerate(values):
            ax.annotate(fmt.format(v), (i, v), ha="center", va="bottom", fontsize=9)
    fig.suptitle(f"{Path(str(report['data'])).name}: {report['examples']}-shot ICL vs LoraHub")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
