"""A portfolio of restarts: which modules, in which order, with which seed and optimizer each
restart searches, what each one found, and which ones a synchronous halving stops. Ray-free; the Ray
search runs every plan as a Tune trial (:mod:`lorahub_ray.cluster.tune`), the local search is one
restart (restart 0).

Restart 0 is exactly the one-process search: the given optimizer and seed, the modules in their
given order. The others are diversified, so that they do not repeat it: seeds ``seed + r``, the
modules in a permuted order (seeded; Cobyla, NGOpt's choice for one ask at a time, does not draw
random numbers but steps through the coordinates in list order, so the order is what makes its
restarts differ), and, with a ``portfolio`` of optimizer names, those optimizers cycled over
restarts 1, 2, .... With ``modules_per_restart`` every restart draws its own subset (the paper's
protocol: restart 0's in sorted order). ``candidates`` narrows the pool the modules come from (a
preselection's best modules, for instance). ``start_ranking`` (module indices, best first: a preselection's
ranking) makes every restart start at weight 1 on the best-ranked of its modules instead of at 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from lorahub_ray.core.search import Evaluation
from lorahub_ray.errors import LoraHubError


@dataclass
class RestartPlan:
    restart: int
    seed: int
    modules: list[int]  # module indices, in the order of the restart's search coordinates
    optimizer: str  # a nevergrad registry name, or the label of the run's own optimizer object
    start: int | None = None  # the module index whose weight starts at 1 (the others at 0); None: all start at 0

    def to_json(self) -> dict:
        return asdict(self)

    def init(self) -> list[float] | None:
        """The search's starting weights, in the order of ``modules`` (None: the optimizer's default, 0)."""
        return None if self.start is None else [1.0 if m == self.start else 0.0 for m in self.modules]


@dataclass
class RestartOutcome:
    """What one restart found: its weights in the order of ``plan.modules``."""

    plan: RestartPlan
    weights: list[float]
    objective: float
    algorithm: str
    finished: bool = True  # False when halving stopped it early: its best evaluated point stands
    history: list[Evaluation] = field(default_factory=list)

    @property
    def restart(self) -> int:
        return self.plan.restart

    def canonical(self) -> tuple[list[int], list[float]]:
        """The modules in ascending index order and their weights (what the recipe records)."""
        pairs = sorted(zip(self.plan.modules, self.weights))
        return [m for m, _ in pairs], [w for _, w in pairs]


def plan_restarts(num_modules: int, restarts: int, *, seed: int, optimizer: str,
                  portfolio: Sequence[str] | None = None, modules_per_restart: int | None = None,
                  candidates: Sequence[int] | None = None,
                  start_ranking: Sequence[int] | None = None) -> list[RestartPlan]:
    """The plans of ``restarts`` restarts over modules ``0..num_modules-1`` (see the module docstring)."""
    if restarts < 1:
        raise LoraHubError(f"restarts must be at least 1, got {restarts}")
    if modules_per_restart is not None and modules_per_restart < 1:
        raise LoraHubError(f"modules per restart must be at least 1, got {modules_per_restart}")
    pool = list(range(num_modules)) if candidates is None else [int(i) for i in candidates]
    if not pool or any(not 0 <= i < num_modules for i in pool):
        raise LoraHubError(f"restart candidates must be module indices in 0..{num_modules - 1}, got {pool}")
    rng = np.random.RandomState(seed)
    plans = []
    for r in range(restarts):
        if modules_per_restart is not None and modules_per_restart < len(pool):
            drawn = [pool[int(i)] for i in rng.choice(len(pool), modules_per_restart, replace=False)]
            modules = sorted(drawn) if r == 0 else drawn
        else:
            modules = list(pool) if r == 0 else [pool[int(i)] for i in rng.permutation(len(pool))]
        name = optimizer if r == 0 or not portfolio else portfolio[(r - 1) % len(portfolio)]
        start = next((int(m) for m in start_ranking if m in modules), None) if start_ranking is not None else None
        plans.append(RestartPlan(restart=r, seed=seed + r, modules=modules, optimizer=name, start=start))
    return plans


def best_outcome(outcomes: Sequence[RestartOutcome]) -> RestartOutcome:
    """The lowest objective wins; a tie goes to the lower restart (restart 0 before the others)."""
    return min(outcomes, key=lambda o: (o.objective, o.restart))


def halving_rungs(budget: int) -> list[int]:
    """The rungs of a synchronous halving: ``budget // 4`` evaluations, then doubling, below the budget."""
    out, rung = [], max(1, budget // 4)
    while rung < budget:
        out.append(rung)
        rung *= 2
    return out


def halving_stops(bests: dict[int, Sequence[float]], budget: int, protected: int = 0) -> dict[int, int]:
    """Which restarts a synchronous successive halving stops, and at which rung: ``{restart: rung}``.

    ``bests[r]`` is restart ``r``'s best objective so far after each of its evaluations. At each rung
    (:func:`halving_rungs`) the worse half of the restarts still live stops: ranked by their best at
    that rung, ties to the lower restart; ``protected`` (restart 0, the one-process search) never
    stops, so the winner is never worse than one process. A rung is decided only once every live
    restart has reached it, so that the answer depends on the values alone, never on which restart
    got there first: fed a partial record (a run in progress), it returns the decisions made so far,
    and fed the full record, the same ones and the rest."""
    live, stops = sorted(bests), {}
    for rung in halving_rungs(budget):
        if any(len(bests[r]) < rung for r in live):
            break
        ranked = sorted(live, key=lambda r: (bests[r][rung - 1], r))
        keep = set(ranked[: -(-len(ranked) // 2)])
        stops.update({r: rung for r in live if r not in keep and r != protected})
        live = [r for r in live if r not in stops]
    return stops
