"""Preselection on the evaluator actors: every module scored alone, the chunks of
:func:`lorahub_ray.core.preselect.screen` spread over the actors.

Chunk ``c`` (modules ``c·chunk ..``, their one-hot candidates sharing forward passes) goes to actor
``c mod W``; the chunks and their contents are those of the one-process :func:`screen`, so the scores
and the k chosen are the ones the local search gets (to rounding), and a run repeats exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import ray

from lorahub_ray.core.preselect import DEFAULT_CHUNK, Screening, check_k, preselect


def screen_on_actors(actors: Sequence, names: Sequence[str], k: int, *, chunk: int = DEFAULT_CHUNK) -> Screening:
    """Score the hub's modules (``names``, in hub order) on the actors' current examples; keep the ``k`` best."""
    check_k(k, len(names))
    start = time.perf_counter()
    chunks = [list(range(s, min(s + chunk, len(names)))) for s in range(0, len(names), chunk)]
    refs = [actors[c % len(actors)].losses.remote([[1.0 if j == i else 0.0 for j in range(len(indices))]
                                                   for i in range(len(indices))], indices)
            for c, indices in enumerate(chunks)]
    scores = [float(v) if math.isfinite(v) else math.inf for part in ray.get(refs) for v in part]
    return Screening(list(names), scores, k, preselect(scores, k), time.perf_counter() - start)
