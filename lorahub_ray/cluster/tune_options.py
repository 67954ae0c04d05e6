"""Tune's schedulers, search algorithms and tracking callbacks for the search, chosen by name.

* Schedulers (``--scheduler``, on a portfolio of restart trials): ``fifo`` (none), ``halving`` (a
  deterministic synchronous successive halving, :class:`SyncHalving`), and Tune's own ``asha`` and
  ``median``. Whatever the scheduler, restart 0 (the one-process search) is never stopped
  (:class:`KeepRestartZero`), so the winner is never worse than one process. A Python caller may pass any
  ``TrialScheduler``: it is wrapped the same way.
* Search algorithms (``--searcher``, a candidate per trial): ``random``, ``optuna``, ``hyperopt`` and
  ``nevergrad`` (NGOpt), seeded, each starting at the reference's point (all weights 0), run under
  ``ConcurrencyLimiter(W)``; or any ``tune.search.Searcher`` object. A searcher that raises inside
  ``suggest`` would hang Tune: :class:`GuardedSearcher` ends the run instead, and the error is raised.
* Tracking (``--callback``): ``tensorboard``, ``mlflow``, ``wandb``: Tune's logger callbacks. A missing
  package is a one-line error that names it, before anything starts.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

from ray import tune
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter, Searcher

from lorahub_ray.core.portfolio import halving_stops
from lorahub_ray.errors import LoraHubError

# --- schedulers ---------------------------------------------------------------------------------


class KeepRestartZero(TrialScheduler):
    """Another scheduler's decisions, except that restart 0 is never stopped."""

    def __init__(self, inner: TrialScheduler):
        super().__init__()
        self.inner = inner

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial) -> None:
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        return TrialScheduler.CONTINUE if decision == TrialScheduler.STOP and _restart(trial) == 0 else decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        return self.inner.choose_trial_to_run(tune_controller)

    def debug_string(self) -> str:
        return f"{self.inner.debug_string()} (restart 0 never stopped)"

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


class SyncHalving(FIFOScheduler):
    """A synchronous successive halving of the restarts (:func:`lorahub_ray.core.portfolio.halving_stops`):
    at rungs of budget/4, budget/2, ... evaluations the worse half of the live restarts stops, restart 0
    never. A rung is decided once every live restart has reported it, so the decisions depend on the values
    alone, not on arrival order. What a stopped restart ran beyond its rung is not counted: the driver takes
    the outcomes from the same function over the trials' histories. After a restore (the scheduler's state
    is not saved with the experiment) the rungs already passed cannot be decided here any more, and the
    trials run on; the outcomes are the same."""

    def __init__(self, budget: int, restarts: Sequence[int]):
        super().__init__()
        self.budget = budget
        self.bests: dict[int, list[float]] = {int(r): [] for r in restarts}

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        restart, bests = _restart(trial), self.bests.get(_restart(trial))
        if bests is not None and result.get("evaluations") == len(bests) + 1:
            bests.append(result["best_objective"])
        return TrialScheduler.STOP if restart in halving_stops(self.bests, self.budget) else TrialScheduler.CONTINUE


def _restart(trial) -> int | None:
    return trial.config.get("restart")


def _asha(budget: int):
    # time in evaluations; ASHA's decisions depend on the order in which trials reach a rung
    return tune.schedulers.ASHAScheduler(time_attr="evaluations", max_t=budget, grace_period=max(1, budget // 4),
                                         reduction_factor=2)


def _median(budget: int):
    return tune.schedulers.MedianStoppingRule(time_attr="evaluations", grace_period=max(1, budget // 4),
                                              min_samples_required=2)


SCHEDULERS: dict[str, Callable[[int], TrialScheduler] | None] = {"fifo": None, "halving": None, "asha": _asha,
                                                                  "median": _median}


def check_scheduler(name) -> None:
    if name is None or isinstance(name, TrialScheduler):
        return
    if name not in SCHEDULERS:
        raise LoraHubError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)} (or pass a Tune "
                           "TrialScheduler in Python)")


def make_scheduler(name, budget: int, restarts: Sequence[int]) -> TrialScheduler | None:
    """The scheduler named ``name`` (or a ``TrialScheduler``), restart 0 kept; None for FIFO."""
    check_scheduler(name)
    if isinstance(name, TrialScheduler):
        return KeepRestartZero(name)
    if name in (None, "fifo"):
        return None
    if name == "halving":
        return SyncHalving(budget, restarts)
    return KeepRestartZero(SCHEDULERS[name](budget))


# --- search algorithms --------------------------------------------------------------------------


class GuardedSearcher(Searcher):
    """A searcher whose errors end the run: Tune hangs when ``suggest`` raises, so the error is kept in
    ``error`` and the searcher says it has finished."""

    def __init__(self, inner: Searcher):
        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.error = inner, None

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.inner.set_max_concurrency(max_concurrent)

    def suggest(self, trial_id: str):
        if self.error is not None:
            return Searcher.FINISHED
        try:
            return self.inner.suggest(trial_id)
        except Exception as exc:  # noqa: BLE001 - any error of a third-party searcher ends the run
            self.error = exc
            return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        self.inner.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.inner.on_trial_complete(trial_id, result=result, error=error)

    def save(self, checkpoint_path: str) -> None:
        self.inner.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.inner.restore(checkpoint_path)


def _random(start, seed, budget, workers):
    return BasicVariantGenerator(points_to_evaluate=[start], random_state=seed)


def _optuna(start, seed, budget, workers):
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(metric="objective", mode="min", points_to_evaluate=[start], seed=seed)


def _hyperopt(start, seed, budget, workers):
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(metric="objective", mode="min", points_to_evaluate=[start], random_state_seed=seed)


def _nevergrad(start, seed, budget, workers):
    import nevergrad as ng
    from ray.tune.search.nevergrad import NevergradSearch

    # NGOpt with one worker is Cobyla, which Tune cannot run (it hangs or cannot be pickled): at least 2
    optimizer = ng.optimizers.NGOpt
    return NevergradSearch(optimizer=optimizer, optimizer_kwargs={"budget": budget, "num_workers": max(2, workers)},
                           metric="objective", mode="min", points_to_evaluate=[start])


# name -> (factory(start point, seed, budget, workers), the package it needs)
SEARCHERS: dict[str, tuple[Callable, str | None]] = {"random": (_random, None), "optuna": (_optuna, "optuna"),
                                                      "hyperopt": (_hyperopt, "hyperopt"),
                                                      "nevergrad": (_nevergrad, "nevergrad")}


def check_searcher(name) -> None:
    if name is None or isinstance(name, Searcher):
        return
    if name not in SEARCHERS:
        raise LoraHubError(f"unknown searcher {name!r}; choose from {', '.join(SEARCHERS)} (or pass a Tune "
                           "Searcher in Python)")
    _need(SEARCHERS[name][1], f"--searcher {name}")


def make_searcher(name, start: dict, *, seed: int, budget: int, workers: int) -> GuardedSearcher:
    """The search algorithm named ``name`` (or a ``Searcher``), at most ``workers`` trials at a time."""
    check_searcher(name)
    searcher = name if isinstance(name, Searcher) else SEARCHERS[name][0](start, seed, budget, workers)
    if not isinstance(searcher, BasicVariantGenerator):  # the generator limits itself (max_concurrent)
        searcher = ConcurrencyLimiter(searcher, max_concurrent=workers)
    return GuardedSearcher(searcher) if isinstance(searcher, Searcher) else searcher


# --- tracking callbacks -------------------------------------------------------------------------


def _tensorboard():
    from ray.tune.logger import TBXLoggerCallback

    return TBXLoggerCallback()


def _mlflow():
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return MLflowLoggerCallback(experiment_name="lorahub-ray")


def _wandb():
    from ray.air.integrations.wandb import WandbLoggerCallback

    return WandbLoggerCallback(project="lorahub-ray")


# name -> (factory, the package it needs)
CALLBACKS: dict[str, tuple[Callable[[], tune.Callback], str]] = {"tensorboard": (_tensorboard, "tensorboardX"),
                                                                  "mlflow": (_mlflow, "mlflow"),
                                                                  "wandb": (_wandb, "wandb")}


def _need(package: str | None, what: str) -> None:
    if package is not None and importlib.util.find_spec(package) is None:
        raise LoraHubError(f"{what} needs the package '{package}': pip install {package}")


def check_callbacks(names: Sequence) -> None:
    """Every callback is known and its package installed (``tune.Callback`` objects pass)."""
    for name in names or ():
        if isinstance(name, tune.Callback):
            continue
        if name not in CALLBACKS:
            raise LoraHubError(f"unknown callback {name!r}; choose from {', '.join(CALLBACKS)}")
        _need(CALLBACKS[name][1], f"--callback {name}")


def make_callbacks(names: Sequence) -> list[tune.Callback]:
    """Tune's tracking callbacks by name (``tune.Callback`` objects pass through)."""
    check_callbacks(names)
    return [name if isinstance(name, tune.Callback) else CALLBACKS[name][0]() for name in names or ()]
