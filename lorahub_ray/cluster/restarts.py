"""The portfolio of restarts in lockstep over the evaluator actors: the search loop of the Ray search.

Every restart is a sequential nevergrad search (its own optimizer, seed and module order, see
:mod:`lorahub_ray.core.portfolio`). They advance in rounds: in each round every live restart asks
``asks`` candidates (one by default); each candidate is put in the canonical module order (ascending
module index) and the round's candidates are split over the W actors by a fixed rule
(:func:`split_round`: contiguous shares in restart order, sizes by R and W only), so that each actor
evaluates its share in ONE call, the candidates sharing forward passes; the values are told back
restart by restart. Nothing depends on timing, so a run repeats exactly, and a restart's search is
the one it would run alone (restart 0: the one-process search).

After every round the histories are saved (``save``, overlapping the next round's evaluation); a
resumed run rebuilds each optimizer by :func:`replay`. With ``halving`` (``--scheduler asha``), a
synchronous successive halving replaces Tune's ASHA: at rungs of ``budget/4, budget/2, ...``
evaluations the worse half of the live restarts stops (by best objective so far, ties to the lower
restart), restart 0 never, so the winner is still at least as good as the one-process search.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray

from lorahub_ray.core.portfolio import RestartOutcome, RestartPlan
from lorahub_ray.core.search import Evaluation, algorithm_name, make_optimizer, recommended


class StopRequested(Exception):
    """The driver was asked to stop (SIGINT/SIGUSR1); the histories up to the last round are saved."""


@dataclass
class Restart:
    plan: RestartPlan
    opt: object
    history: list[Evaluation] = field(default_factory=list)
    stopped: bool = False  # by halving

    @property
    def best(self) -> float:
        return min((e.objective for e in self.history), default=math.inf)


def split_round(n: int, workers: int) -> list[range]:
    """Candidates ``0..n-1`` of a round as contiguous shares for the actors ``0..W-1``, sizes differing by
    at most one (the first actors take the larger shares); actors beyond ``n`` get none."""
    size, extra = divmod(n, workers)
    shares, start = [], 0
    for a in range(workers):
        stop = start + size + (1 if a < extra else 0)
        shares.append(range(start, stop))
        start = stop
    return shares


def canonical(modules: Sequence[int], weights: Sequence[float]) -> tuple[list[int], list[float]]:
    """A candidate in ascending module order (so that candidates of permuted restarts share passes)."""
    pairs = sorted(zip(modules, weights))
    return [int(m) for m, _ in pairs], [float(w) for _, w in pairs]


def replay(opt, history: Sequence[Evaluation], asks: int) -> None:
    """Bring a fresh optimizer (same seed, same ``asks``) to the state it had after ``history``, without
    evaluating anything: ask in the same batches, check each candidate is the recorded one, tell the
    recorded value. nevergrad is deterministic for a given seed, so this is the state that was saved
    (its own pickling does not cover every algorithm NGOpt may pick, e.g. Cobyla's thread)."""
    for start in range(0, len(history), asks):
        batch = history[start : start + asks]
        candidates = [opt.ask() for _ in batch]
        for cand, e in zip(candidates, batch):
            if not np.allclose(cand.value, e.weights, rtol=0, atol=1e-9):
                raise RuntimeError(f"cannot resume: the optimizer asked a different candidate at step {e.step} "
                                   "than the saved run (a different nevergrad version?)")
            opt.tell(cand, e.objective)


def start_restarts(plans: Sequence[RestartPlan], optimizers: dict[str, object], *, budget: int, asks: int,
                   histories: dict[int, list[Evaluation]] | None = None,
                   stopped: Sequence[int] = ()) -> list[Restart]:
    """One optimizer per plan (``optimizers`` maps a plan's optimizer label to a class, for custom
    ones), brought to the state of its saved history."""
    histories = histories or {}
    restarts = []
    for plan in plans:
        opt = make_optimizer(optimizers.get(plan.optimizer, plan.optimizer), len(plan.modules), budget=budget,
                             seed=plan.seed, num_workers=asks, init=plan.init())
        history = list(histories.get(plan.restart, []))
        replay(opt, history, asks)
        restarts.append(Restart(plan, opt, history, plan.restart in stopped))
    return restarts


def submit_round(actors: Sequence, items: Sequence[tuple[list[int], list[float]]]) -> Callable[[], list[float]]:
    """Send a round's canonical candidates ``(modules, weights)``: one ``evaluate_subsets`` call per
    actor share; returns the function that waits for the values, in the order of ``items``."""
    calls = []
    for actor, share in zip(actors, split_round(len(items), len(actors))):
        if share:
            part = [items[j] for j in share]
            calls.append((share, actor.evaluate_subsets.remote([w for _, w in part], [m for m, _ in part])))

    def collect() -> list[float]:
        values = [math.inf] * len(items)
        for (share, _), part in zip(calls, ray.get([ref for _, ref in calls])):
            for j, v in zip(share, part):
                values[j] = float(v) if math.isfinite(v) else math.inf
        return values

    return collect


def rungs(budget: int) -> list[int]:
    """Halving's rungs: ``budget // 4`` evaluations, then doubling, below the budget."""
    out, rung = [], max(1, budget // 4)
    while rung < budget:
        out.append(rung)
        rung *= 2
    return out


def run_lockstep(restarts: list[Restart], actors: Sequence, *, budget: int, asks: int, halving: bool = False,
                 on_evaluation: Callable[[Restart, Evaluation], None] | None = None,
                 save: Callable[[list[Restart]], None] | None = None,
                 stop_requested: Callable[[], bool] = lambda: False) -> list[RestartOutcome]:
    """Run ``restarts`` to their budget in rounds over ``actors``; every restart's outcome, in order."""
    began = {id(r): time.perf_counter() - (r.history[-1].wall if r.history else 0.0) for r in restarts}
    checkpoints = set(rungs(budget)) if halving else set()
    unsaved = False
    while True:
        live = [r for r in restarts if not r.stopped and len(r.history) < budget]
        if not live:
            break
        asked = [(r, r.opt.ask()) for r in live for _ in range(min(asks, budget - len(r.history)))]
        start = time.perf_counter()
        collect = submit_round(actors, [canonical(r.plan.modules, c.value) for r, c in asked])
        if unsaved and save is not None:
            save(restarts)  # the previous round, while this one is evaluated
        values = collect()
        seconds = (time.perf_counter() - start) / max(len(s) for s in split_round(len(asked), len(actors)))
        for (r, cand), value in zip(asked, values):
            r.opt.tell(cand, value)
            e = Evaluation(len(r.history), [float(x) for x in cand.value], value, seconds, trial=r.plan.restart,
                           wall=time.perf_counter() - began[id(r)])
            r.history.append(e)
            if on_evaluation is not None:
                on_evaluation(r, e)
        unsaved = True
        done = {len(r.history) for r in live}
        if checkpoints & done:
            halve(live)
        if stop_requested():
            if save is not None:
                save(restarts)
            raise StopRequested()
    if unsaved and save is not None:
        save(restarts)
    return finish_restarts(restarts, actors)


def halve(live: list[Restart]) -> None:
    """Stop the worse half of the live restarts (restart 0 never stops)."""
    ranked = sorted(live, key=lambda r: (r.best, r.plan.restart))
    keep = {id(r) for r in ranked[: math.ceil(len(ranked) / 2)]}
    for r in live:
        if id(r) not in keep and r.plan.restart != 0:
            r.stopped = True


def finish_restarts(restarts: list[Restart], actors: Sequence) -> list[RestartOutcome]:
    """Each restart's result as the reference takes it: the optimizer's recommendation, with its
    objective (the recommended points never evaluated, e.g. CMA means, in one more round); a restart
    stopped by halving keeps its best evaluated point."""
    outcomes: dict[int, RestartOutcome] = {}
    unseen = []
    for r in restarts:
        algorithm = algorithm_name(r.opt)
        if r.stopped:
            best = min(r.history, key=lambda e: e.objective)
            outcomes[r.plan.restart] = RestartOutcome(r.plan, best.weights, best.objective, algorithm, False, r.history)
            continue
        weights, seen = recommended(r.opt, r.history)
        outcome = RestartOutcome(r.plan, weights, seen.objective if seen else math.nan, algorithm, True, r.history)
        outcomes[r.plan.restart] = outcome
        if seen is None:
            unseen.append(outcome)
    if unseen:
        values = submit_round(actors, [canonical(o.plan.modules, o.weights) for o in unseen])()
        for o, v in zip(unseen, values):
            o.objective = v
    return [outcomes[r.plan.restart] for r in restarts]
