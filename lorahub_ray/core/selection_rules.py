"""How ``select cv`` picks its winner from the candidates' held-out scores over the folds
(:mod:`lorahub_ray.core.selection` runs the folds): the rules, chosen by name with ``SelectionConfig.rule``.

A *row* is one candidate's scores: ``name``, ``kind`` (``base``, ``single`` or ``search``), ``fold_losses``,
``cv_loss`` (their mean, weighted by held-out examples), ``cv_loss_se`` and, with ``score="generate"``,
``cv_accuracy``. :func:`rank_keys` gives each row its sort key (rank 1 wins); :func:`reason` says why in words.

* ``paired`` (the default): the reference search (:data:`DEFAULT`) unless a candidate's held-out loss is lower than
  its fold by fold by more than one standard error of the paired differences (:func:`paired_gain`); then the lowest
  loss of those;
* ``one-se``: the simplest candidate (base < single module < search) whose mean held-out loss is within one standard
  error of the lowest (Hastie, Tibshirani and Friedman, *Elements of Statistical Learning*, 7.10);
* ``min``: the lowest mean held-out loss.

Why ``paired`` is the default. Five held-out examples give each candidate's mean loss a standard error as large as
the differences between candidates, and there are some thirty candidates. Under ``one-se`` many of them lie within
the noise of the lowest, and the rule then takes the "simplest", a module alone: in effect the single module with
the luckiest folds, often one that answers one thing to everything (the issue's ``single:strategyqa`` on BBH
navigate). On the real tasks measured (docs/bbh.md) it fell at or below ``paired`` on every one. ``paired`` asks
what the folds can answer: whether a candidate beats the paper's search on the same examples, fold by fold, by more
than the noise of those differences. On the embedded default, whose hub holds each task's own skill by design,
``one-se`` keeps more of those single modules and scores higher (docs/search.md); ``--select-rule one-se`` keeps it.

With ``score="generate"`` the highest held-out exact match wins, the loss breaking ties.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

RULES = ("paired", "one-se", "min")  # the default first
KINDS = {"base": 0, "single": 1, "search": 2}  # simpler first
DEFAULT = "lorahub"  # the reference search from 0: what rule="paired" keeps unless the folds show better


class RankingConfig(Protocol):
    """What a rule reads of :class:`lorahub_ray.core.selection.SelectionConfig`."""

    score: str  # "loss" or "generate"
    rule: str  # one of RULES


def standard_error(values: Sequence[float]) -> float:
    """The standard error of the mean of the fold scores (0 for one fold; inf when one is infinite)."""
    if len(values) < 2:
        return 0.0
    if not all(math.isfinite(v) for v in values):
        return math.inf
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))


def paired_gain(row: dict, anchor: dict) -> tuple[float, float]:
    """How much lower ``row``'s held-out loss is than ``anchor``'s, fold by fold: the mean of the paired differences
    and its standard error. A row with an infinite fold loss gains ``-inf``; against an anchor with one (and a row
    without), ``+inf``."""
    mine, theirs = row["fold_losses"], anchor["fold_losses"]
    if not all(math.isfinite(v) for v in mine):
        return -math.inf, 0.0
    if not all(math.isfinite(v) for v in theirs):
        return math.inf, 0.0
    diffs = [t - m for m, t in zip(mine, theirs)]
    return sum(diffs) / len(diffs), standard_error(diffs)


def rank_keys(config: RankingConfig, rows: list[dict]) -> tuple[list[tuple], float | None]:
    """Each row's sort key (rank 1 is the winner) and, under the one-SE rule, the loss threshold. Under the paired
    rule each row also gets its ``paired_gain`` and ``paired_gain_se`` against the reference search (for the report
    and :func:`reason`)."""
    if config.score == "generate":
        return [(-r["cv_accuracy"], r["cv_loss"], i) for i, r in enumerate(rows)], None
    if config.rule == "min":
        return [(r["cv_loss"], i) for i, r in enumerate(rows)], None
    if config.rule == "paired":
        # a candidate that beats the reference search fold by fold by more than one standard error of the
        # differences, the lowest loss of those first; then the reference search; the rest after, by loss
        anchor = next(r for r in rows if r["name"] == DEFAULT)
        keys = []
        for i, r in enumerate(rows):
            gain, se = paired_gain(r, anchor)
            r["paired_gain"], r["paired_gain_se"] = gain, se
            beats = r is not anchor and gain - se > 0
            keys.append((0, r["cv_loss"], i) if beats else (1, 0.0, i) if r is anchor else (2, r["cv_loss"], i))
        return keys, None
    best = min(rows, key=lambda r: r["cv_loss"])
    threshold = best["cv_loss"] + best["cv_loss_se"] if math.isfinite(best["cv_loss_se"]) else best["cv_loss"]
    # within the threshold: the simpler kind first, then the lower loss; the rest after, by loss
    return [(0, KINDS[r["kind"]], r["cv_loss"], i) if r["cv_loss"] <= threshold else (1, 0, r["cv_loss"], i)
            for i, r in enumerate(rows)], threshold


def reason(config: RankingConfig, rows: list[dict], folds: int, threshold: float | None) -> str:
    best = rows[0]
    if config.score == "generate":
        what = (f"the highest held-out exact match over {folds} folds ({best['cv_accuracy']:.1f}%, mean held-out "
                f"loss {best['cv_loss']:.4f} breaks ties)")
        other = lambda r: f"{r['name']} ({r['cv_accuracy']:.1f}%, loss {r['cv_loss']:.4f})"  # noqa: E731
    elif config.rule == "paired":
        gain = lambda r: f"{r['paired_gain']:.4f} ± {r['paired_gain_se']:.4f}"  # noqa: E731
        if best["name"] == DEFAULT:
            challenger = rows[1] if len(rows) > 1 else None
            what = (f"no candidate that beats it fold by fold by more than one standard error over {folds} folds "
                    f"(it is the reference search, kept unless one does)")
            if challenger is not None:
                what += f"; closest {challenger['name']} (loss lower by {gain(challenger)})"
            return f"{best['name']} has {what}"
        what = (f"the lowest mean held-out loss over {folds} folds ({best['cv_loss']:.4f}) of the candidates whose loss "
                f"is lower than the reference search's fold by fold by more than one standard error (by {gain(best)})")
        other = lambda r: f"{r['name']} ({r['cv_loss']:.4f})"  # noqa: E731
    elif threshold is None:
        what = f"the lowest mean held-out loss over {folds} folds ({best['cv_loss']:.4f})"
        other = lambda r: f"{r['name']} ({r['cv_loss']:.4f})"  # noqa: E731
    else:
        lowest = min(rows, key=lambda r: r["cv_loss"])
        what = (f"a mean held-out loss over {folds} folds of {best['cv_loss']:.4f}, within one standard error of the "
                f"lowest ({lowest['name']}: {lowest['cv_loss']:.4f} + {lowest['cv_loss_se']:.4f}), and is the "
                f"simplest such candidate")
        if lowest is best:
            what = (f"the lowest mean held-out loss over {folds} folds ({best['cv_loss']:.4f} ± "
                    f"{best['cv_loss_se']:.4f}), and no simpler candidate is within one standard error of it")
        other = lambda r: f"{r['name']} ({r['cv_loss']:.4f})"  # noqa: E731
    runner_up = f"; runner-up {other(rows[1])}" if len(rows) > 1 else ""
    return f"{best['name']} has {what}{runner_up}"
