"""LoraHub learning on a Ray cluster: the search as Ray Tune trials over W model-holding evaluator actors.

Design (docs/ray-tune.md has it in full, with the measured figures):

* ``W`` :class:`~lorahub_ray.cluster.evaluators.Evaluators` actors each load the base model once, take the
  stacked modules from the object store once and tokenise the examples once. They are named, and created
  with ``max_restarts``/``max_task_retries``: one that dies is restarted by Ray and its calls retried.
* By default the search is a portfolio of R = W restarts (:func:`lorahub_ray.core.portfolio.plan_restarts`:
  restart 0 is exactly the one-process search, the others are diversified), one **Tune trial per
  restart** (:mod:`lorahub_ray.cluster.tune`): a light trial (0.01 CPU, no model) runs its restart's
  sequential nevergrad search and sends each candidate to its evaluator, reporting every evaluation with a
  checkpoint. The lowest objective wins, so the winner is never worse than one process.
* Tune does the rest: ``--resume`` is ``Tuner.restore`` of the experiment ``<storage>/search`` (local or
  S3), a failed trial restarts from its checkpoint (``FailureConfig``), Ctrl-C saves the experiment, the
  schedulers stop restarts early (:mod:`lorahub_ray.cluster.tune_options`; restart 0 never), results are a
  ``ResultGrid`` with Tune's loggers, and tracking goes through Tune's callbacks.
* With ``searcher``, any Tune search algorithm replaces the portfolio: a trial per candidate weight vector.
* The winner is written with the core :func:`~lorahub_ray.core.learning.write_output`: ``recipe.json``
  (``search.backend = "tune"``, ``search.experiment``), ``adapter/``, ``history.parquet`` (one schema with
  the local search), ``search.png`` and, with ``merge``, the merged ``model/``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray import tune

from lorahub_ray.cluster import tune as lorahub_tune
from lorahub_ray.cluster.connect import connect, default_cpus_per_worker
from lorahub_ray.cluster.evaluators import Evaluators, ResourceError, SearchFailed, check_resources, root_message
from lorahub_ray.cluster.run_spec import (RUN_FILE, RunSpec, check_ray_options, normalise_output, read_spec, read_text,
                                          storage_root)
from lorahub_ray.cluster.screening import screen_on_actors
from lorahub_ray.cluster.tune_options import make_callbacks, make_scheduler, make_searcher
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.families import check_template
from lorahub_ray.core.learning import load_module_list, make_recipe, now, write_output
from lorahub_ray.core.model import base_model_sha256, check_base_model, load_base_model, load_model
from lorahub_ray.core.modules import LoraModule, check_compatible, load_module
from lorahub_ray.core.objective import l1_regularization
from lorahub_ray.core.portfolio import RestartOutcome, RestartPlan, best_outcome, plan_restarts
from lorahub_ray.core.preselect import check_k
from lorahub_ray.core.recipe import RECIPE_FILE, Recipe
from lorahub_ray.core.search import DEFAULT_BUDGET, DEFAULT_OPTIMIZER
from lorahub_ray.core.settings import SearchSettings
from lorahub_ray.errors import LoraHubError, LoraHubWarning
from lorahub_ray.io import storage
from lorahub_ray.io.examples import as_examples
from lorahub_ray.plots import plot_search
from lorahub_ray.progress import RestartsDisplay

__all__ = ["RayLoraHubResult", "ResourceError", "SearchFailed", "SearchInterrupted", "lorahub_learning_ray"]

PLOT_FILE = "search.png"


class SearchInterrupted(RuntimeError):
    """The search was interrupted (Ctrl-C, SIGUSR1); Tune saved the experiment: resume it from the output."""

    def __init__(self, message: str, resume: str):
        super().__init__(message)
        self.resume = resume


@dataclass
class RayLoraHubResult:
    recipe: Recipe
    restarts: list[RestartOutcome]
    best: RestartOutcome
    output: Path | str | None
    storage: str
    seconds: float
    experiment: str = ""
    merged: tuple | None = field(default=None, repr=False)  # (model, tokenizer), built with merge or on first use

    @property
    def weights(self) -> dict[str, float]:
        return self.recipe.module_weights

    @property
    def model(self):
        """The base model with the winner merged in (loaded from the output's adapter on first use)."""
        return self._merged()[0]

    @property
    def tokenizer(self):
        return self._merged()[1]

    def _merged(self) -> tuple:
        if self.merged is None:
            self.merged = load_model(self.output)
        return self.merged


def lorahub_learning_ray(
    model: str | None = None,
    modules: Sequence[str | LoraModule] | None = None,
    examples=None,
    *,
    output: str | Path | None = None,
    workers: int = 2,
    restarts: int | None = None,
    modules_per_restart: int | None = None,
    portfolio: Sequence[str] | None = None,
    budget: int = DEFAULT_BUDGET,
    optimizer=DEFAULT_OPTIMIZER,
    seed: int = 42,
    loss="reference",
    batch_size: int | None = None,
    regularizer: Callable[[Sequence[float]], float] = l1_regularization,
    input_field: str = "input",
    output_field: str = "output",
    address: str | None = None,
    cpus_per_worker: float | None = None,
    gpus_per_worker: float = 0.0,
    device: str | None = None,
    scheduler=None,
    searcher=None,
    callbacks: Sequence = (),
    max_failures: int = 2,
    asks: int | None = None,
    storage_path: str | None = None,
    resume: str | Path | None = None,
    actor_restarts: int = 3,
    ready_timeout: float = 600.0,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    template: str = "plain",
    preselect: int | None = None,
    merge: bool = False,
) -> RayLoraHubResult:
    """LoraHub learning on Ray Tune: a portfolio of ``restarts`` (default ``workers``) sequential searches,
    one Tune trial each, over ``workers`` evaluator actors; the lowest objective wins.

    Arguments as :func:`lorahub_ray.lorahub_learning`, plus: ``address`` (None starts a local Ray;
    ``"auto"``, ``host:port`` or ``ray://...`` joins a cluster), resources per actor (``cpus_per_worker``,
    default an equal share of the cluster's CPUs beside the trials, up to 1; ``gpus_per_worker``, fractions
    share a GPU), ``modules_per_restart`` (a random subset of the hub per restart, the paper's protocol),
    ``portfolio`` (optimizer names cycled over restarts 1, 2, ...; restart 0 runs ``optimizer``),
    ``scheduler`` (``"halving"``, ``"asha"``, ``"median"`` or a Tune ``TrialScheduler``; restart 0 is never
    stopped), ``searcher`` (``"optuna"``, ``"hyperopt"``, ``"nevergrad"``, ``"random"`` or a Tune
    ``Searcher``: a trial per candidate instead of the portfolio, ``budget`` trials), ``callbacks``
    (``"tensorboard"``, ``"mlflow"``, ``"wandb"`` or Tune callbacks), ``max_failures`` (restarts of a
    failed trial from its checkpoint), ``asks`` (candidates asked at once per restart, default 1),
    ``storage_path`` (the run's state and Tune experiment, default ``<output>.search``; ``s3://`` works)
    and ``resume`` (the output of an interrupted run: everything else is read from its state, and Tune
    restores the experiment). ``preselect=k`` first scores every module alone on the actors and plans the
    restarts over the k best. ``callback(event)`` is called after every evaluation with ``{"run",
    "restart", "evaluations", "best", "objective", "pid"}`` (``pid``: the trial's process). ``merge`` also
    writes the merged ``model/`` (a resumed run takes it anew).
    """
    started_at, started = time.time(), now()
    custom = {"optimizer": optimizer if not isinstance(optimizer, str) else None,
              "loss": loss if not isinstance(loss, str) else None,
              "regularizer": regularizer if regularizer is not l1_regularization else None}
    if resume is not None:
        spec = read_spec(resume, **custom)
        base_path = check_base_model(spec.model)
        loaded = [load_module(m["uri"], m["name"], expected_sha256=m["sha256"]) for m in spec.modules]
        check_compatible(loaded)
        objects = {}  # a Python scheduler or searcher comes back with Tune's experiment
    else:
        spec, loaded, base_path = _new_spec(
            model, modules, examples, output=output, workers=workers, restarts=restarts,
            modules_per_restart=modules_per_restart, portfolio=portfolio, device=device, scheduler=scheduler,
            searcher=searcher, callbacks=callbacks, max_failures=max_failures, cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker, storage_path=storage_path, input_field=input_field,
            output_field=output_field, progress=progress, template=template, preselect=preselect,
            settings=SearchSettings(budget=budget, optimizer=optimizer, seed=seed, loss=loss, batch_size=batch_size,
                                    regularizer=regularizer, asks=asks or 1))
        objects = {"scheduler": scheduler, "searcher": searcher, "callbacks": callbacks}
    hashing = ThreadPoolExecutor(1, thread_name_prefix="lorahub-hash")  # the recipe's base hash, while the search runs
    base_sha256 = hashing.submit(base_model_sha256, base_path)
    hashing.shutdown(wait=False)
    started_ray = connect(address)
    evaluators = None
    try:
        trials = spec.workers if spec.searcher is not None else spec.restarts
        reserved = lorahub_tune.TRIAL_CPUS * trials
        if spec.cpus_per_worker is None:
            spec.cpus_per_worker = default_cpus_per_worker(spec.workers, reserved=reserved)
        check_resources(spec.workers, spec.cpus_per_worker, spec.gpus_per_worker, reserved_cpus=reserved)
        spec.write()
        s = spec.settings
        free = ray.available_resources().get("CPU", 0.0)
        if free + 1e-9 < spec.cpus_per_worker * spec.workers + reserved:  # held by other work, or not there yet
            warnings.warn(f"{free:g} CPUs of the cluster are free, but the {spec.workers} evaluators and {trials} trials "
                          f"ask for {spec.cpus_per_worker * spec.workers + reserved:g}: they wait for room (Tune gives "
                          "no sign of it)", LoraHubWarning, stacklevel=2)
        evaluators = Evaluators(spec.model, loaded, spec.inputs, spec.outputs, workers=spec.workers,
                                cpus=spec.cpus_per_worker, gpus=spec.gpus_per_worker, device=spec.device,
                                loss=s.loss, batch_size=s.batch_size, regularizer=s.regularizer,
                                template=spec.template, actor_restarts=actor_restarts)
        asked = spec.extra.get("preselect")
        if asked is not None and "chosen" not in asked:  # a resumed run keeps its screening
            _preselect(spec, evaluators.wait(ready_timeout))  # the screening plans the restarts: it needs the actors
        # otherwise Tune starts (its trials import their code) while the evaluators load the model: a trial waits for
        # its own evaluator
        outcomes, fit_seconds = _tune(spec, evaluators, objects, progress=progress, callback=callback,
                                      ready_timeout=ready_timeout)
    finally:
        if evaluators is not None:
            evaluators.close()
        if started_ray:
            ray.shutdown()
    return _finish(spec, loaded, outcomes, started, time.time() - started_at, base_sha256.result(), fit_seconds,
                   merge)


def _new_spec(model, modules, examples, *, output, workers, restarts, modules_per_restart, portfolio, device,
              scheduler, searcher, callbacks, max_failures, cpus_per_worker, gpus_per_worker, storage_path,
              input_field, output_field, progress, template: str, preselect: int | None,
              settings: SearchSettings) -> tuple[RunSpec, list[LoraModule], Path]:
    """Every check before any expensive work, then the modules and the restart plan."""
    if model is None or not modules or examples is None or output is None:
        raise LoraHubError("model, modules, examples and output are required (or resume=DIR)")
    data = as_examples(examples, input_field=input_field, output_field=output_field)
    settings.check()
    check_template(template)
    check_k(preselect)
    restarts = workers if restarts is None else restarts
    check_ray_options(workers=workers, restarts=restarts, modules_per_restart=modules_per_restart,
                      scheduler=scheduler, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                      portfolio=portfolio, searcher=searcher, callbacks=callbacks, max_failures=max_failures)
    if searcher is not None and (preselect is not None or modules_per_restart is not None or portfolio):
        raise LoraHubError("a searcher searches all the modules itself: it takes no --preselect, "
                           "--modules-per-restart or --portfolio")
    storage.check_output(output, marker=RECIPE_FILE)  # a local directory or an s3:// prefix
    output = normalise_output(output)
    root = storage_root(output, storage_path)
    if read_text(root, RUN_FILE) is not None:
        raise LoraHubError(f"a search already ran in '{root}': resume it with --resume {output} or remove that directory")
    base_path = check_base_model(str(model))  # a wrong model fails here, not in every evaluator
    loaded = load_module_list(modules, progress)
    check_k(preselect, len(loaded))
    plans = plan_restarts(len(loaded), restarts if searcher is None else 1, seed=settings.seed,
                          optimizer=settings.optimizer_label, portfolio=list(portfolio) if portfolio else None,
                          modules_per_restart=modules_per_restart)
    spec = RunSpec(model=str(model), modules=[{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in loaded],
                   inputs=list(data.inputs), outputs=list(data.outputs), output=output, storage=root,
                   settings=settings, workers=workers, plans=plans, portfolio=list(portfolio) if portfolio else None,
                   modules_per_restart=modules_per_restart, cpus_per_worker=cpus_per_worker,
                   gpus_per_worker=gpus_per_worker, device=device, scheduler=_label(scheduler) or "fifo",
                   searcher=_label(searcher), callbacks=[_label(c) for c in callbacks], max_failures=max_failures,
                   examples=None if data.source is None else str(data.source), template=template,
                   extra={} if preselect is None else {"preselect": {"k": preselect}})
    return spec, loaded, base_path


def _label(value) -> str | None:
    return value if value is None or isinstance(value, str) else type(value).__name__


def _preselect(spec: RunSpec, evaluators: Evaluators) -> None:
    """Screen the hub on the actors, plan the restarts over the k best and save both in the run file."""
    asked = spec.extra["preselect"]
    names = [m["name"] for m in spec.modules]
    screening = screen_on_actors(evaluators.actors, names, asked["k"])
    s = spec.settings
    spec.plans = plan_restarts(len(names), spec.restarts, seed=s.seed, optimizer=s.optimizer_label,
                               portfolio=spec.portfolio, modules_per_restart=spec.modules_per_restart,
                               candidates=screening.chosen, start_ranking=screening.ranking())
    spec.extra["preselect"] = screening.to_recipe()
    spec.write()


# --- the Tune run -------------------------------------------------------------------------------


def _tune(spec: RunSpec, evaluators: Evaluators, objects: dict, *, progress: bool, callback,
          ready_timeout: float) -> tuple[list[RestartOutcome], float]:
    """Run (or restore) the Tune experiment of ``spec`` on ``evaluators``: every restart's outcome, and the
    seconds the Tune run took."""
    s = spec.settings
    searcher = None
    if spec.searcher is not None:
        candidates = lorahub_tune.CandidateSpec(len(spec.modules), evaluators.names, ready_timeout=ready_timeout)
        trainable = lorahub_tune.candidate_trainable(candidates)
        plan = RestartPlan(restart=0, seed=s.seed, modules=list(range(len(spec.modules))),
                           optimizer=f"tune:{spec.searcher}")
        display = RestartsDisplay([plan], s.budget, enabled=progress)
        searcher = make_searcher(objects.get("searcher") or spec.searcher, candidates.start(), seed=s.seed,
                                 budget=s.budget, workers=spec.workers)
        space = lorahub_tune.weight_space(candidates)
        tune_config = tune.TuneConfig(metric=lorahub_tune.METRIC, mode=lorahub_tune.MODE, search_alg=searcher,
                                      num_samples=s.budget, reuse_actors=True)
    else:
        restarts = lorahub_tune.RestartSpec(spec.plans, s.budget, s.optimizer, evaluators.names, asks=s.asks,
                                            halving=spec.scheduler == "halving", ready_timeout=ready_timeout)
        trainable = lorahub_tune.restart_trainable(restarts)
        display = RestartsDisplay(spec.plans, s.budget, enabled=progress)
        space = lorahub_tune.restart_space(restarts)
        tune_config = tune.TuneConfig(metric=lorahub_tune.METRIC, mode=lorahub_tune.MODE, scheduler=make_scheduler(
            objects.get("scheduler") or spec.scheduler, s.budget, [p.restart for p in spec.plans]))
    started = time.perf_counter()
    grid = lorahub_tune.fit(trainable, space, tune_config, root=spec.storage, name=Path(spec.experiment).name,
               callbacks=make_callbacks(objects.get("callbacks") or spec.callbacks), max_failures=spec.max_failures,
               listener=lorahub_tune.Listener(display, callback, evaluators.run_id), restore=bool(spec.resumed))
    seconds = time.perf_counter() - started  # Tune's part of the run: the search phase
    _check_finished(grid, spec, getattr(searcher, "error", None))
    if spec.searcher is not None:
        return [lorahub_tune.candidate_outcome(grid, candidates, plan, spec.searcher)], seconds
    return lorahub_tune.restart_outcomes(grid, restarts), seconds


def _check_finished(grid, spec: RunSpec, searcher_error: BaseException | None = None) -> None:
    """A trial that failed past its retries (or a searcher that raised) fails the run. An interrupted run
    (Ctrl-C, SIGUSR1) is told by the experiment Tune saved: it holds trials that had not ended."""
    failed = [r.error for r in grid if r.error is not None]
    cause = searcher_error if searcher_error is not None else (failed[0] if failed else None)
    if cause is not None:
        raise SearchFailed(f"the search failed with {type(cause).__name__}: {root_message(cause)} (its state is "
                           f"saved: --resume {spec.output})") from cause
    filesystem, path = storage.arrow_filesystem(spec.experiment)
    saved = tune.ExperimentAnalysis(path, storage_filesystem=filesystem).trials
    short = spec.searcher is not None and len(saved) < spec.settings.budget
    if short or any(t.status not in ("TERMINATED", "ERROR") for t in saved):
        raise SearchInterrupted(f"the search was interrupted; Tune saved it in {spec.experiment}: resume it with "
                                f"--resume {spec.output}", spec.output)


def describe_restarts(outcomes: list[RestartOutcome], names: list[str]) -> list[dict]:
    """What the recipe records of every restart (``search["restarts"]``)."""
    return [{"restart": o.restart, "seed": o.plan.seed, "optimizer": o.plan.optimizer, "algorithm": o.algorithm,
             "order": [names[i] for i in o.plan.modules], "objective": o.objective, "evaluations": len(o.history),
             "finished": o.finished} for o in outcomes]


def describe_search(spec: RunSpec, outcomes: list[RestartOutcome], best: RestartOutcome, **more) -> dict:
    """``recipe.search`` of a Tune search."""
    return {"backend": "tune", "experiment": spec.experiment, "workers": spec.workers, "asks": spec.settings.asks,
            "modules_per_restart": spec.modules_per_restart, "portfolio": spec.portfolio,
            "scheduler": spec.scheduler, "searcher": spec.searcher, "cpus_per_worker": spec.cpus_per_worker,
            "gpus_per_worker": spec.gpus_per_worker, "storage": spec.storage, "best_restart": best.restart,
            "resumed": spec.resumed, **more,
            **({"preselect": spec.extra["preselect"]} if "preselect" in spec.extra else {}),
            "restarts": describe_restarts(outcomes, [m["name"] for m in spec.modules])}


def _finish(spec: RunSpec, loaded, outcomes: list[RestartOutcome], started: str, seconds: float,
            base_sha256: str, fit_seconds: float, merge: bool = False) -> RayLoraHubResult:
    """Write the winner: its adapter (computed from the modules, no model loaded here), and with ``merge``
    the base model with the adapter merged in."""
    best = best_outcome(outcomes)
    indices, weights = best.canonical()
    chosen = [loaded[i] for i in indices]
    recipe = make_recipe(model=spec.model, base_sha256=base_sha256, modules=chosen, weights=weights,
                         objective=best.objective, optimizer=best.plan.optimizer, algorithm=best.algorithm,
                         seed=best.plan.seed, settings=spec.settings, merge_method="linear",  # the composers'
                         num_examples=len(spec.inputs), started=started,
                         search=describe_search(spec, outcomes, best, seconds=seconds, fit_seconds=fit_seconds),
                         template=spec.template)
    merged = None
    if merge:
        base, tokenizer, _ = load_base_model(spec.model, device=spec.device or "cpu")
        merged = LoraComposer(base, chosen).merge_and_unload(weights), tokenizer
    out = write_output(spec.output, recipe, chosen, merged=merged, history=(outcomes, loaded),
                       extra=lambda directory: plot_search(directory / PLOT_FILE, outcomes, recipe))
    return RayLoraHubResult(recipe=recipe, restarts=outcomes, best=best, output=out, storage=spec.storage,
                            seconds=seconds, experiment=spec.experiment, merged=merged)
