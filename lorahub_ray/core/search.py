"""The gradient-free search over module weights, on nevergrad's ask/tell interface.

The parametrisation is the reference's: an array of K weights in [-1.5, 1.5] starting at 0.
Seeding follows the reference too (``numpy.random.seed(seed)`` before the optimizer draws its
random state), without touching numpy's global state, so the same seed gives the same
candidates as ``lorahub.lorahub_learning``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import nevergrad as ng
import numpy as np

from lorahub_ray.errors import LoraHubError

DEFAULT_OPTIMIZER = "NGOpt"
DEFAULT_BUDGET = 40
DEFAULT_BOUNDS = (-1.5, 1.5)
SUGGESTED_OPTIMIZERS = ("NGOpt", "CMA", "OnePlusOne", "RandomSearch", "Cobyla", "TwoPointsDE")


@dataclass
class Evaluation:
    step: int
    weights: list[float]
    objective: float
    seconds: float  # of this evaluation (a batch's time shared by its candidates)
    trial: int = 0  # the restart it belongs to
    wall: float = 0.0  # seconds since its search started (a resumed search carries on from its history)


@dataclass
class SearchResult:
    weights: list[float]
    objective: float
    optimizer: str
    algorithm: str
    budget: int
    seed: int
    num_workers: int = 1
    history: list[Evaluation] = field(default_factory=list)


def check_optimizer(name) -> None:
    """``name`` is a key of ``nevergrad.optimizers.registry`` or a nevergrad optimizer class/factory."""
    if not isinstance(name, str):
        if not callable(name):
            raise LoraHubError(f"optimizer must be a name or a nevergrad optimizer class, got {name!r}")
        return
    if name not in ng.optimizers.registry:
        raise LoraHubError(f"unknown optimizer {name!r}; try one of {', '.join(SUGGESTED_OPTIMIZERS)} "
                           "(any name in nevergrad.optimizers.registry works)")


def optimizer_label(name) -> str:
    return name if isinstance(name, str) else getattr(name, "__name__", None) or getattr(name, "name", None) or repr(name)


def make_optimizer(name, dim: int, *, budget: int, seed: int, num_workers: int = 1,
                   bounds: tuple[float, float] = DEFAULT_BOUNDS, init: Sequence[float] | None = None):
    """The optimizer over ``dim`` weights in ``bounds``, starting at ``init`` (default 0, the reference's)."""
    check_optimizer(name)
    if budget < 1:
        raise LoraHubError(f"budget must be at least 1, got {budget}")
    lower, upper = bounds
    init = [0.0] * dim if init is None else [float(x) for x in init]
    if len(init) != dim or not all(lower <= x <= upper for x in init):
        raise LoraHubError(f"init must be {dim} weights within [{lower}, {upper}], got {init}")
    param = ng.p.Array(init=init, lower=[lower] * dim, upper=[upper] * dim)
    # what numpy.random.seed(seed) followed by nevergrad's own draw would give, without global state
    param.random_state = np.random.RandomState(np.random.RandomState(seed).randint(2**32, dtype=np.uint32))
    factory = ng.optimizers.registry[name] if isinstance(name, str) else name
    return factory(parametrization=param, budget=budget, num_workers=num_workers)


def algorithm_name(optimizer) -> str:
    """The algorithm that really runs: NGOpt and other wizards delegate to a sub-optimizer."""
    current, names = optimizer, [optimizer.name]
    while hasattr(current, "optim"):
        try:
            current = current.optim
        except Exception:  # a wizard that cannot decide yet
            break
        if current is None or current.name == names[-1]:
            break
        names.append(current.name)
    return names[-1] if len(names) > 1 else names[0]


def _finite(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.inf


def minimize(objective: Callable[[Sequence[float]], float], dim: int, *, budget: int = DEFAULT_BUDGET,
             optimizer: str = DEFAULT_OPTIMIZER, seed: int = 42, bounds=DEFAULT_BOUNDS,
             evaluate_batch: Callable[[list[list[float]]], list[float]] | None = None, num_workers: int = 1,
             callback: Callable[[Evaluation, float], None] | None = None, opt=None,
             history: list[Evaluation] | None = None, on_batch: Callable[[object, list[Evaluation]], None] | None = None,
             submit_batch: Callable[[list[list[float]]], Callable[[], list[float]]] | None = None,
             init: Sequence[float] | None = None) -> SearchResult:
    """Minimise ``objective`` over ``dim`` weights with the nevergrad optimizer named ``optimizer``.

    With ``num_workers > 1`` and ``evaluate_batch``, up to ``num_workers`` candidates are asked at
    once and evaluated together (as in parallel workers), then told back in order. ``callback`` is
    called after each evaluation with the evaluation and the best objective so far.

    ``submit_batch(candidates)``, instead of ``evaluate_batch``, starts the evaluations elsewhere and
    returns a function that waits for their values: bookkeeping then overlaps with them.

    To resume a search, pass the optimizer (``opt``) and the ``history`` it was told. ``on_batch(opt,
    history)`` is called once per told batch with the history up to that batch (a point to save
    it): while the next batch is being evaluated, and once more at the end.
    """
    if opt is None:  # starting at ``init`` (default 0, the reference's)
        opt = make_optimizer(optimizer, dim, budget=budget, seed=seed, num_workers=num_workers, bounds=bounds,
                             init=init)
    if submit_batch is None:
        evaluate = evaluate_batch or (lambda ws: [objective(w) for w in ws])

        def submit_batch(ws):
            values = evaluate(ws)
            return lambda: values
    history = list(history or [])
    best = min((e.objective for e in history), default=math.inf)
    told_unsaved = False
    began = time.perf_counter() - (history[-1].wall if history else 0.0)
    while len(history) < budget:
        n = min(num_workers, budget - len(history))
        candidates = [opt.ask() for _ in range(n)]
        start = time.perf_counter()
        collect = submit_batch([c.value.tolist() for c in candidates])
        if told_unsaved and on_batch is not None:
            on_batch(opt, history)  # the previous batch, while this one is evaluated
        values = collect()
        seconds = (time.perf_counter() - start) / n
        for cand, value in zip(candidates, values):
            value = _finite(value)
            opt.tell(cand, value)
            best = min(best, value)
            history.append(Evaluation(len(history), [float(x) for x in cand.value], value, seconds,
                                      wall=time.perf_counter() - began))
            if callback is not None:
                callback(history[-1], best)
        told_unsaved = True
    if told_unsaved and on_batch is not None:
        on_batch(opt, history)
    return finish(opt, history, objective, optimizer=optimizer, budget=budget, seed=seed, num_workers=num_workers)


def replay(opt, history: Sequence[Evaluation], asks: int = 1) -> None:
    """Bring a fresh optimizer (same seed, same ``asks``) to the state it had after ``history``, without
    evaluating anything: ask in the same batches, check each candidate is the recorded one, tell the
    recorded value. nevergrad is deterministic for a given seed, so this is the state that was reached
    (its own pickling does not cover every algorithm NGOpt may pick: Cobyla runs in a thread)."""
    for start in range(0, len(history), asks):
        batch = history[start : start + asks]
        candidates = [opt.ask() for _ in batch]
        for cand, e in zip(candidates, batch):
            if not np.allclose(cand.value, e.weights, rtol=0, atol=1e-9):
                raise LoraHubError(f"cannot resume: the optimizer asked a different candidate at step {e.step} "
                                   "than the saved run (another nevergrad version?)")
            opt.tell(cand, e.objective)


def recommended(opt, history: list[Evaluation]) -> tuple[list[float], Evaluation | None]:
    """The optimizer's recommendation, and its evaluation in ``history`` (``None`` when the point was
    never evaluated, e.g. a CMA mean)."""
    weights = [float(x) for x in opt.provide_recommendation().value]
    seen = [e for e in history if np.allclose(e.weights, weights, rtol=0, atol=1e-12)]
    return weights, seen[0] if seen else None


def finish(opt, history: list[Evaluation], objective, *, optimizer: str, budget: int, seed: int,
           num_workers: int) -> SearchResult:
    """The recommendation as the reference takes it, with its objective (evaluated once more only
    when the recommended point was never evaluated)."""
    weights, seen = recommended(opt, history)
    value = seen.objective if seen is not None else _finite(objective(weights))
    return SearchResult(weights=weights, objective=value, optimizer=optimizer_label(optimizer), algorithm=algorithm_name(opt),
                        budget=budget, seed=seed, num_workers=num_workers, history=history)
