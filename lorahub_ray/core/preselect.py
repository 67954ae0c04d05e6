"""Preselection for large hubs: score every module alone on the few-shot examples, keep the k best.

A module's score is the few-shot loss of the composition that gives it weight 1 and every other
module weight 0 (the module alone, as trained), without the regulariser, which is the same for
every one-hot vector. :func:`screen` runs the candidates through shared forward passes
(:meth:`FewShotObjective.losses`, the examples repeated once per candidate) in chunks, so memory
stays bounded whatever the size of the hub: a chunk of ``chunk`` modules composes each candidate
from the chunk's own rows (:meth:`LoraComposer.compose` with ``modules``), not from the whole hub.

:func:`preselect` keeps the ``k`` lowest scores. The search over them runs on the composer
restricted to them (:meth:`LoraComposer.restrict`), exactly the search given those modules directly,
except where it starts: at weight 1 on the best-scored module of them (:meth:`Screening.ranking`),
not at 0. The screen has already found that module; started at 0, a search of 40 evaluations over 20
weights spends most of its budget on Cobyla's first simplex and often ends below that module alone
(measured in ``benchmarks/preselect.py``: 24.2% mean held-out accuracy from 0 against 42.0% from the best,
and 39.2% for the best module alone, over 9 few-shot problems of the embedded default's 50-module hub).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lorahub_ray.core.modules import LoraModule
from lorahub_ray.core.objective import FewShotObjective
from lorahub_ray.errors import LoraHubError
from lorahub_ray.io import storage

DEFAULT_CHUNK = 8  # candidates per shared forward pass: rows = chunk × examples


def check_k(k: int | None, num_modules: int | None = None) -> None:
    """``k`` is at least 1 and (when the hub size is known) at most the number of modules."""
    if k is None:
        return
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise LoraHubError(f"preselect must be a whole number of modules, at least 1, got {k!r}")
    if num_modules is not None and k > num_modules:
        raise LoraHubError(f"preselect {k} is more than the hub's {num_modules} modules")


def hub_size(modules: Sequence[str | LoraModule]) -> int:
    """How many modules ``modules`` names once folders are expanded, without loading any (as
    :func:`lorahub_ray.core.modules.load_modules` expands them)."""
    return sum(1 if isinstance(m, LoraModule) else len(storage.list_adapter_uris(str(m))) for m in modules)


def screen(objective: FewShotObjective, num_modules: int, *, chunk: int = DEFAULT_CHUNK,
           progress: Callable[[int], None] | None = None) -> list[float]:
    """The loss of each module alone (weight 1, the others 0), in hub order; NaN or infinite is +inf.

    ``chunk`` modules at a time share forward passes; ``progress(n)`` is called after each chunk
    with the number of modules scored in it."""
    if chunk < 1:
        raise LoraHubError(f"chunk must be at least 1, got {chunk}")
    scores: list[float] = []
    for start in range(0, num_modules, chunk):
        indices = list(range(start, min(start + chunk, num_modules)))
        one_hot = [[1.0 if j == i else 0.0 for j in range(len(indices))] for i in range(len(indices))]
        losses = objective.losses(one_hot, indices)
        scores.extend(float(v) if math.isfinite(v) else math.inf for v in losses)
        if progress is not None:
            progress(len(indices))
    return scores


def preselect(scores: Sequence[float], k: int) -> list[int]:
    """The indices of the ``k`` lowest scores (ties: the earlier module), in hub order."""
    check_k(k, len(scores))
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(ranked[:k])


@dataclass
class Screening:
    """A hub screened for one task: every module's score, and the ``k`` chosen (hub indices)."""

    names: list[str]
    scores: list[float]
    k: int
    chosen: list[int]
    seconds: float

    def ranking(self) -> list[int]:
        """The chosen modules, best score first (ties: the earlier module). The searches over them start at
        weight 1 on the best of their modules (see :func:`lorahub_ray.core.portfolio.plan_restarts`)."""
        return sorted(self.chosen, key=lambda i: (self.scores[i], i))

    def to_recipe(self) -> dict:
        """What ``recipe.search["preselect"]`` records."""
        return {
            "k": self.k,
            "score": "loss of the module alone (weight 1, the others 0) on the few-shot examples",
            "scores": {n: (s if math.isfinite(s) else None) for n, s in zip(self.names, self.scores)},
            "chosen": [self.names[i] for i in self.chosen],
            "start": self.names[self.ranking()[0]],  # the searches start at weight 1 on it
            "seconds": self.seconds,
        }


def screen_and_choose(objective: FewShotObjective, names: Sequence[str], k: int, *, chunk: int = DEFAULT_CHUNK,
                      progress: Callable[[int], None] | None = None) -> Screening:
    """:func:`screen` the hub, then :func:`preselect` its ``k`` best."""
    check_k(k, len(names))
    start = time.perf_counter()
    scores = screen(objective, len(names), chunk=chunk, progress=progress)
    return Screening(list(names), scores, k, preselect(scores, k), time.perf_counter() - start)

