"""LoraHub's search as Ray Tune trials: the trainables, their ``param_space`` and what a Tune user needs
to run them with a ``tune.Tuner`` of their own.

Two kinds of trial, both light (a fraction of a CPU, no model): they send candidates to W long-lived
:class:`~lorahub_ray.cluster.evaluators.Evaluators` actors, which hold the base model and the stacked
modules, and look them up by name.

* **A restart per trial** (:func:`restart_trainable`, :func:`restart_space`): trial ``r`` runs restart
  ``r`` of the portfolio (:func:`lorahub_ray.core.portfolio.plan_restarts`: restart 0 is the
  one-process search), a sequential nevergrad search, on evaluator ``r mod W``. It reports every
  evaluation (``objective``, ``best_objective``, ``step``, ``restart``, ...) with a checkpoint of its
  history; the last report also holds the restart's result (``done``, ``result_objective``,
  ``result_weights``). A restored trial replays its history into a fresh optimizer (NGOpt's Cobyla
  cannot be pickled) and goes on. Each candidate is evaluated alone on one fixed actor, so its value
  does not depend on timing, and a run, restored or not, repeats exactly.
* **A candidate per trial** (:func:`candidate_trainable`, :func:`weight_space`): for any Tune search
  algorithm (Optuna, HyperOpt, nevergrad, ...): ``param_space`` holds the K weights in [-1.5, 1.5],
  a trial evaluates one weight vector and reports its ``objective``. Use it with
  ``ConcurrencyLimiter(searcher, W)``, ``num_samples=budget`` and ``reuse_actors=True``.

A Tune user's own run::

    from ray import tune
    from lorahub_ray.cluster import tune as lorahub_tune

    with Evaluators(model, modules, inputs, outputs, workers=2, cpus=0.9) as evaluators:
        spec = lorahub_tune.RestartSpec(plans, budget=40, optimizer="NGOpt", evaluators=evaluators.names)
        grid = tune.Tuner(lorahub_tune.restart_trainable(spec), param_space=lorahub_tune.restart_space(spec),
                          tune_config=tune.TuneConfig(metric="objective", mode="min")).fit()
        outcomes = lorahub_tune.restart_outcomes(grid, spec)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ray
from ray import tune

from lorahub_ray.cluster.evaluators import root_message
from lorahub_ray.core.portfolio import RestartOutcome, RestartPlan, halving_stops
from lorahub_ray.core.search import (DEFAULT_BOUNDS, Evaluation, algorithm_name, make_optimizer, optimizer_label,
                                     recommended, replay)
from lorahub_ray.errors import LoraHubError
from lorahub_ray.io import storage
from lorahub_ray.progress import RestartsDisplay

METRIC, MODE = "objective", "min"
TRIAL_CPUS = 0.01  # a trial runs the optimizer only; Tune cannot schedule a trial on 0 CPUs
STATE_FILE = "restart.json"
SNAPSHOT_S = "5"  # Tune's experiment snapshots (TUNE_GLOBAL_CHECKPOINT_S) unless set: what a lost driver redoes


@dataclass(frozen=True)
class RestartSpec:
    """What the restart trials need: the plans, the search's settings and the evaluators' names."""

    plans: Sequence[RestartPlan]
    budget: int
    optimizer: object  # the run's optimizer: a nevergrad registry name or an optimizer class
    evaluators: Sequence[str]
    asks: int = 1
    halving: bool = False  # a synchronous halving decides which restarts stop (see restart_outcomes)
    ready_timeout: float = 600.0  # how long a trial waits for its evaluator to start

    def optimizer_of(self, plan: RestartPlan):
        """A plan names its optimizer; the run's own (possibly a class) when the names agree."""
        return self.optimizer if plan.optimizer == optimizer_label(self.optimizer) else plan.optimizer


def restart_space(spec: RestartSpec) -> dict:
    """One trial per restart of the plan."""
    return {"restart": tune.grid_search([p.restart for p in spec.plans])}


def restart_trainable(spec: RestartSpec):
    """The restart trainable, with ``spec`` bound and a trial's small resource request."""
    return tune.with_resources(tune.with_parameters(run_restart, spec=spec), {"cpu": TRIAL_CPUS})


def _evaluator(names: Sequence[str], index: int, timeout: float):
    """Evaluator ``index mod W``, once it has started: the trials start while the evaluators load the model."""
    actor = ray.get_actor(names[index % len(names)])
    try:
        ray.get(actor.ready.remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise RuntimeError(f"the evaluators did not start within {timeout:g} s; the cluster may lack the resources "
                           "they ask for") from None
    except ray.exceptions.RayActorError as exc:
        raise RuntimeError(f"an evaluator failed to start: {root_message(exc)}") from None
    return actor


def _report(metrics: dict, history: list[Evaluation] | None = None, result: dict | None = None) -> None:
    """``tune.report``, with a checkpoint of ``history`` (and ``result``) when given one. The report
    persists the checkpoint to the run's storage before it returns; the local copy goes then."""
    if history is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="lorahub-restart-") as directory:
        (Path(directory) / STATE_FILE).write_text(json.dumps({"history": [asdict(e) for e in history],
                                                              "result": result}))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def read_state(checkpoint: tune.Checkpoint | None) -> tuple[list[Evaluation], dict | None]:
    """A restart trial's history and result (None until it finished) from its checkpoint."""
    if checkpoint is None:
        return [], None
    with checkpoint.as_directory() as directory:
        state = json.loads((Path(directory) / STATE_FILE).read_text())
    return [Evaluation(**e) for e in state["history"]], state["result"]


def run_restart(config: dict, *, spec: RestartSpec) -> None:
    """A Tune function trainable: restart ``config["restart"]`` of ``spec``, resumable from its checkpoint."""
    plan = spec.plans[config["restart"]]
    evaluator = _evaluator(spec.evaluators, plan.restart, spec.ready_timeout)
    history, result = read_state(tune.get_checkpoint())
    if result is not None:  # it had finished when the run stopped: report its end again
        _report({**_metrics(plan, history[-1], history, result["algorithm"]), **_done(result)}, history, result)
        return
    opt = make_optimizer(spec.optimizer_of(plan), len(plan.modules), budget=spec.budget, seed=plan.seed,
                         num_workers=spec.asks, init=plan.init())
    replay(opt, history, spec.asks)
    began = time.perf_counter() - (history[-1].wall if history else 0.0)
    unreported: list[Evaluation] = []

    def report(evaluations: list[Evaluation], result: dict | None = None) -> None:
        """One report per evaluation; the last of a batch with the checkpoint (and the result, at the end)."""
        algorithm = algorithm_name(opt)
        for e in evaluations[:-1]:
            _report(_metrics(plan, e, history, algorithm))
        last = evaluations[-1]
        _report({**_metrics(plan, last, history, algorithm), **(_done(result) if result else {})},
                history[: last.step + 1], result)

    while len(history) < spec.budget:
        asked = [opt.ask() for _ in range(min(spec.asks, spec.budget - len(history)))]
        start = time.perf_counter()
        call = evaluator.evaluate_subsets.remote(*_canonical(plan.modules, [c.value for c in asked]))
        if unreported:  # the report and checkpoint of the last batch overlap this one's evaluation
            report(unreported)
        values = ray.get(call)
        seconds = (time.perf_counter() - start) / len(asked)
        unreported = []
        for cand, value in zip(asked, values):
            value = float(value) if math.isfinite(value) else math.inf
            opt.tell(cand, value)
            history.append(Evaluation(len(history), [float(x) for x in cand.value], value, seconds,
                                      trial=plan.restart, wall=time.perf_counter() - began))
            unreported.append(history[-1])
    weights, seen = recommended(opt, history)  # the reference's answer: the optimizer's recommendation
    objective = seen.objective if seen is not None else float(
        ray.get(evaluator.evaluate_subsets.remote(*_canonical(plan.modules, [weights])))[0])
    result = {"weights": weights, "objective": objective, "algorithm": algorithm_name(opt)}
    report(unreported or history[-1:], result)


def _canonical(modules: Sequence[int], candidates) -> tuple[list[list[float]], list[list[int]]]:
    """Candidates in ascending module order, as the evaluators take them."""
    order = sorted(range(len(modules)), key=lambda i: modules[i])
    return ([[float(c[i]) for i in order] for c in candidates], [[int(modules[i]) for i in order]] * len(candidates))


def _metrics(plan: RestartPlan, e: Evaluation, history: list[Evaluation], algorithm: str) -> dict:
    return {"restart": plan.restart, "step": e.step, "evaluations": e.step + 1, "objective": e.objective,
            "best_objective": min(h.objective for h in history[: e.step + 1]), "seconds": e.seconds,
            "seed": plan.seed, "optimizer": plan.optimizer, "algorithm": algorithm, "done": False}


def _done(result: dict) -> dict:
    return {"done": True, "result_objective": result["objective"], "result_weights": result["weights"]}


def restart_outcomes(grid, spec: RestartSpec) -> list[RestartOutcome]:
    """Every restart's outcome, in restart order, from a finished Tune run (a ``ResultGrid``): the
    optimizer's recommendation with its objective; with ``spec.halving``, a restart that the halving
    stopped keeps its best point up to the rung where it stopped, whatever it ran beyond it."""
    states = {}
    for result in grid:
        history, end = read_state(result.checkpoint)
        states[result.config["restart"]] = (history, end)
    missing = [p.restart for p in spec.plans if p.restart not in states or not states[p.restart][0]]
    if missing:
        raise LoraHubError(f"restart(s) {missing} of the Tune run left no checkpoint")
    stops = halving_stops({r: _bests(h) for r, (h, _) in states.items()}, spec.budget) if spec.halving else {}
    outcomes = []
    for plan in spec.plans:
        history, end = states[plan.restart]
        if plan.restart in stops or end is None:  # stopped early: its best evaluated point (up to its rung) stands
            history = history[: stops.get(plan.restart, len(history))]
            best = min(history, key=lambda e: e.objective)
            outcomes.append(RestartOutcome(plan, best.weights, best.objective, _algorithm(grid, plan), False, history))
        else:
            outcomes.append(RestartOutcome(plan, end["weights"], end["objective"], end["algorithm"], True, history))
    return outcomes


def _bests(history: Sequence[Evaluation]) -> list[float]:
    out, best = [], math.inf
    for e in history:
        best = min(best, e.objective)
        out.append(best)
    return out


def _algorithm(grid, plan: RestartPlan) -> str:
    for result in grid:
        if result.config["restart"] == plan.restart and result.metrics:
            return result.metrics.get("algorithm", plan.optimizer)
    return plan.optimizer


# --- running a Tuner -----------------------------------------------------------------------------


class Listener:
    """Where the Tune events of the run being fitted in this process go: the live display, the user's callback."""

    def __init__(self, display, callback, run_id: str):
        self.display, self.callback, self.run_id = display, callback, run_id


_ACTIVE: list[Listener] = []  # the run whose Tuner.fit() runs in this process now


class RunEvents(tune.Callback):
    """The search's Tune callback. It holds no state, because Tune pickles it with the experiment and a
    restored run gets the pickled one back: it reports to the run being fitted in this process."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if not _ACTIVE or "objective" not in result:
            return
        listener = _ACTIVE[-1]
        restart = result.get("restart", 0)
        listener.display.update(restart, result.get("evaluations", result.get("training_iteration", 0)),
                                result.get("best_objective", result["objective"]), result.get("algorithm", ""))
        if listener.callback is not None:
            listener.callback({"run": listener.run_id, "restart": restart,
                               "evaluations": result.get("evaluations", result.get("training_iteration")),
                               "best": result.get("best_objective", result["objective"]),
                               "objective": result["objective"], "pid": result.get("pid")})


@contextlib.contextmanager
def _listening(listener: Listener):
    _ACTIVE.append(listener)
    try:
        with listener.display:
            yield
    finally:
        _ACTIVE.remove(listener)


@contextlib.contextmanager
def _quiet_tune():
    """Tune's own console reporter off (the live display is ours); its loggers still write the experiment."""
    saved = {k: os.environ.get(k) for k in ("RAY_AIR_NEW_OUTPUT", "TUNE_GLOBAL_CHECKPOINT_S")}
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", SNAPSHOT_S)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def fit(trainable, space: dict, tune_config: tune.TuneConfig, *, root: str, name: str, callbacks=(),
        max_failures: int = 2, listener: Listener | None = None, restore: bool = False):
    """``Tuner(...).fit()`` of an experiment ``root/name`` (local or ``s3://``), or, with ``restore`` and a
    saved experiment there, ``Tuner.restore(...).fit()``: Tune's own console output off, the events to
    ``listener``. A restore without a saved experiment (a driver lost before Tune saved anything) runs the
    experiment from the start, which gives the same result."""
    filesystem, storage_path = storage.arrow_filesystem(root)
    path = f"{storage_path.rstrip('/')}/{name}"
    if restore and tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        run_config = tune.RunConfig(
            name=name, storage_path=storage_path, storage_filesystem=filesystem, verbose=0,
            callbacks=[RunEvents(), *callbacks], failure_config=tune.FailureConfig(max_failures=max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None))  # a snapshot may name any of them
        tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config)
    with _quiet_tune(), _listening(listener or Listener(RestartsDisplay([], 1, enabled=False), None, "")):
        return tuner.fit()


# --- a candidate per trial, for any Tune search algorithm ----------------------------------------


@dataclass(frozen=True)
class CandidateSpec:
    """What a candidate trial needs: the number of modules, the bounds and the evaluators' names."""

    num_modules: int
    evaluators: Sequence[str]
    bounds: tuple[float, float] = DEFAULT_BOUNDS
    ready_timeout: float = 600.0  # how long a trial waits for its evaluator to start
    keys: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        width = len(str(self.num_modules - 1))
        object.__setattr__(self, "keys", tuple(f"w{i:0{width}d}" for i in range(self.num_modules)))

    def weights(self, config: dict) -> list[float]:
        return [float(config[k]) for k in self.keys]

    def start(self) -> dict:
        """The reference's starting point, all weights 0: a searcher's ``points_to_evaluate``."""
        return {k: 0.0 for k in self.keys}


def weight_space(spec: CandidateSpec) -> dict:
    """The ``param_space`` of a candidate trial: one uniform weight per module, in the bounds."""
    low, high = spec.bounds
    return {k: tune.uniform(low, high) for k in spec.keys}


def candidate_trainable(spec: CandidateSpec):
    return tune.with_resources(tune.with_parameters(run_candidate, spec=spec), {"cpu": TRIAL_CPUS})


def run_candidate(config: dict, *, spec: CandidateSpec) -> None:
    """A Tune function trainable: the objective of one weight vector, on an evaluator chosen by the trial's
    index (so that concurrent trials spread over the actors)."""
    trial_id = tune.get_context().get_trial_id() or "0"
    index = int(trial_id.rsplit("_", 1)[-1]) if trial_id.rsplit("_", 1)[-1].isdigit() else 0
    weights = spec.weights(config)
    start = time.perf_counter()
    value = float(ray.get(_evaluator(spec.evaluators, index, spec.ready_timeout).evaluate_subsets.remote(
        [weights], [list(range(spec.num_modules))]))[0])
    tune.report({METRIC: value if math.isfinite(value) else math.inf, "trial": index,
                 "seconds": time.perf_counter() - start})


def candidate_outcome(grid, spec: CandidateSpec, plan: RestartPlan, algorithm: str) -> RestartOutcome:
    """The best candidate of a searcher's run, with every trial as one evaluation (in trial order)."""
    rows = sorted(((r.metrics["trial"], spec.weights(r.config), r.metrics[METRIC], r.metrics["seconds"])
                   for r in grid if r.metrics and METRIC in r.metrics), key=lambda row: row[0])
    if not rows:
        raise LoraHubError("the searcher's Tune run reported no evaluation")
    history = [Evaluation(step, w, v, s, wall=sum(x[3] for x in rows[: step + 1]))
               for step, (_, w, v, s) in enumerate(rows)]
    best = min(history, key=lambda e: (e.objective, e.step))
    return RestartOutcome(plan, best.weights, best.objective, algorithm, True, history)
