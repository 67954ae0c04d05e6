"""The paper's protocol on Ray: many tasks, each a portfolio of restarts as Tune trials, on ONE set of
evaluator actors.

:class:`RayRunner` is a :class:`~lorahub_ray.core.protocol.TaskRunner` for
:func:`~lorahub_ray.core.protocol.run_tasks`. Its ``W`` :class:`~lorahub_ray.cluster.evaluators.Evaluators`
load the base model and the whole hub once for all tasks; a task hands them its examples (tokenised
there), is screened with ``preselect`` (:mod:`lorahub_ray.cluster.screening`), and runs the Ray search's
portfolio (the plans of :func:`lorahub_ray.core.portfolio.plan_restarts`) as one Tune experiment,
``<output>.search/<task>``, a trial per restart (:mod:`lorahub_ray.cluster.tune`), so that each task gets
what :func:`~lorahub_ray.cluster.ray_search.lorahub_learning_ray` gives it alone. Each task's winner is
written as an adapter; with ``merge`` the driver also holds one base model and the hub, to merge each
winner into a copy. ``DIR/<task>/`` and ``DIR/summary.json`` are written by :func:`run_tasks`, as on the
local path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import ray
from ray import tune

from lorahub_ray.cluster import tune as lorahub_tune
from lorahub_ray.cluster.connect import connect, default_cpus_per_worker
from lorahub_ray.cluster.evaluators import Evaluators, SearchFailed, check_resources, root_message
from lorahub_ray.cluster.ray_search import describe_restarts
from lorahub_ray.cluster.run_spec import STORAGE_SUFFIX, check_ray_options, normalise_output
from lorahub_ray.cluster.screening import screen_on_actors
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.families import check_template
from lorahub_ray.core.learning import make_recipe, now, write_output
from lorahub_ray.core.model import base_model_sha256, check_base_model, load_base_model
from lorahub_ray.core.modules import LoraModule
from lorahub_ray.core.objective import l1_regularization
from lorahub_ray.core.portfolio import plan_restarts
from lorahub_ray.core.preselect import check_k
from lorahub_ray.core import protocol
from lorahub_ray.core.settings import SearchSettings
from lorahub_ray.errors import DataError
from lorahub_ray.evaluation.evaluate import list_data_files, task_name
from lorahub_ray.io.examples import Examples


class _TaskProgress:
    """The protocol's progress bar as a restarts display: one step per finished restart."""

    def __init__(self, task: str, restarts: int, budget: int, advance: Callable[..., None]):
        self.task, self.restarts, self.budget, self.advance = task, restarts, budget, advance

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def update(self, restart: int, evaluations: int, best: float, algorithm: str = "") -> None:
        if evaluations == self.budget:
            self.advance(info=f"{self.task}: restart {restart + 1}/{self.restarts} done, best {best:.4f}")


class RayRunner:
    """Restarts of every task on one set of Ray evaluator actors (see the module docstring). Close it
    (or use it as a context manager) to end its actors and the Ray it started."""

    def __init__(self, modules: Sequence[LoraModule], *, model: str, storage: str, device: str | None = None,
                 budget: int = 40, optimizer: str = "NGOpt", seed: int = 42, restarts: int | None = None,
                 modules_per_restart: int | None = None, preselect: int | None = None, loss="reference",
                 batch_size: int | None = None, regularizer: Callable = l1_regularization, workers: int = 2,
                 portfolio: Sequence[str] | None = None, asks: int | None = None, address: str | None = None,
                 cpus_per_worker: float | None = None, gpus_per_worker: float = 0.0, template: str = "plain",
                 actor_restarts: int = 3, ready_timeout: float = 600.0, max_failures: int = 2,
                 merge: bool = False):
        self.settings = SearchSettings(budget=budget, optimizer=optimizer, seed=seed, loss=loss,
                                       batch_size=batch_size, regularizer=regularizer, asks=asks or 1)
        self.settings.check()
        check_template(template)
        self.restarts = workers if restarts is None else restarts
        check_ray_options(workers=workers, restarts=self.restarts, modules_per_restart=modules_per_restart,
                          scheduler=None, cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                          portfolio=portfolio, max_failures=max_failures)
        check_k(preselect, len(modules))
        self.modules, self.model, self.template, self.storage = list(modules), str(model), template, storage
        self.merge = merge
        self.workers, self.portfolio, self.max_failures = workers, list(portfolio) if portfolio else None, max_failures
        self.modules_per_restart, self.preselect = modules_per_restart, preselect
        self.gpus_per_worker, self.device = gpus_per_worker, device or ("cuda" if gpus_per_worker > 0 else "cpu")
        base_path = check_base_model(self.model)
        self.evaluators: Evaluators | None = None
        self.started_ray = connect(address)
        try:
            reserved = lorahub_tune.TRIAL_CPUS * self.restarts
            self.cpus_per_worker = cpus_per_worker or default_cpus_per_worker(workers, reserved=reserved)
            check_resources(workers, self.cpus_per_worker, gpus_per_worker, reserved_cpus=reserved)
            s = self.settings
            self.evaluators = Evaluators(self.model, self.modules, workers=workers, cpus=self.cpus_per_worker,
                                         gpus=gpus_per_worker, device=self.device, loss=s.loss,
                                         batch_size=s.batch_size, regularizer=s.regularizer, template=template,
                                         actor_restarts=actor_restarts)
            self.composer = None
            if merge:  # a base model here too, to merge each task's winner into a copy (while the actors start)
                base, self.tokenizer, _ = load_base_model(self.model, device=device or "cpu")
                self.composer = LoraComposer(base, self.modules)
            self.base_sha256 = base_model_sha256(base_path)
            self.evaluators.wait(ready_timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.evaluators is not None:
            self.evaluators.close()
            self.evaluators = None
        if self.started_ray:
            ray.shutdown()
            self.started_ray = False

    def __enter__(self) -> "RayRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def search(self, task: str, examples: Examples, advance: Callable[..., None]) -> protocol.TaskSearch:
        started, s = now(), self.settings
        self.evaluators.set_examples(examples.inputs, examples.outputs)
        screening = None
        if self.preselect is not None:
            screening = screen_on_actors(self.evaluators.actors, [m.name for m in self.modules], self.preselect)
        plans = plan_restarts(len(self.modules), self.restarts, seed=s.seed, optimizer=s.optimizer_label,
                              portfolio=self.portfolio, modules_per_restart=self.modules_per_restart,
                              candidates=screening.chosen if screening is not None else None,
                              start_ranking=screening.ranking() if screening is not None else None)
        spec = lorahub_tune.RestartSpec(plans, s.budget, s.optimizer, self.evaluators.names, asks=s.asks)
        grid = lorahub_tune.fit(lorahub_tune.restart_trainable(spec), lorahub_tune.restart_space(spec),
                   tune.TuneConfig(metric=lorahub_tune.METRIC, mode=lorahub_tune.MODE), root=self.storage,
                   name=task, max_failures=self.max_failures,
                   listener=lorahub_tune.Listener(_TaskProgress(task, self.restarts, s.budget, advance), None, task))
        failed = [r.error for r in grid if r.error is not None]
        if failed:
            raise SearchFailed(f"the search failed with {type(failed[0]).__name__}: {root_message(failed[0])}")
        outcomes = lorahub_tune.restart_outcomes(grid, spec)
        return protocol.TaskSearch(outcomes, screening, started)

    def write(self, task: str, examples: Examples, search: protocol.TaskSearch, output: str) -> str:
        best = search.best
        indices, weights = best.canonical()
        whole = indices == list(range(len(self.modules)))
        merged = None
        if self.merge:
            with contextlib.nullcontext() if whole else self.composer.restrict(indices):
                merged = protocol.merged_copy(self.composer, weights), self.tokenizer
        described = {"backend": "tune", "experiment": f"{self.storage.rstrip('/')}/{task}", "task": task,
                     "workers": self.workers, "asks": self.settings.asks, "modules_per_restart": self.modules_per_restart, "portfolio": self.portfolio,
                     "scheduler": "fifo", "cpus_per_worker": self.cpus_per_worker,
                     "gpus_per_worker": self.gpus_per_worker, "best_restart": best.restart,
                     "restarts": describe_restarts(search.restarts, [m.name for m in self.modules])}
        if search.screening is not None:
            described["preselect"] = search.screening.to_recipe()
        recipe = make_recipe(model=self.model, base_sha256=self.base_sha256,
                             modules=[self.modules[i] for i in indices], weights=weights, objective=best.objective,
                             optimizer=best.plan.optimizer, algorithm=best.algorithm, seed=best.plan.seed,
                             settings=self.settings, merge_method="linear",  # the composers' own
                             num_examples=len(examples), started=search.started, search=described,
                             template=self.template)
        return str(write_output(output, recipe, [self.modules[i] for i in indices], merged=merged,
                                history=(search.restarts, self.modules)))


def lorahub_tasks_ray(model: str, modules, tasks: str, *, output: str, workers: int = 2,
                      restarts: int | None = None, portfolio: Sequence[str] | None = None, asks: int | None = None,
                      address: str | None = None, cpus_per_worker: float | None = None,
                      gpus_per_worker: float = 0.0, **options) -> dict:
    """:func:`lorahub_ray.api.lorahub_tasks` on Ray: every task of ``tasks`` (a folder or ``s3://``
    prefix of few-shot files) a portfolio of ``restarts`` (default ``workers``) restarts over
    ``workers`` evaluator actors that load the model and hub once. ``options`` as
    :func:`~lorahub_ray.core.protocol.run_protocol` takes them. Returns the summary."""
    files = [(task_name(f), f) for f in list_data_files(tasks)]
    if not files:
        raise DataError(f"no task files (.jsonl, .json, .parquet, .csv) at or under '{tasks}'")
    runners: list[RayRunner] = []

    def make_runner(loaded, **chosen) -> RayRunner:
        runners.append(RayRunner(loaded, workers=workers, portfolio=portfolio, asks=asks, address=address,
                                 cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                                 storage=normalise_output(output) + STORAGE_SUFFIX, **chosen))
        return runners[-1]

    try:
        return protocol.run_protocol(model, modules, files, output=output,
                                     restarts=workers if restarts is None else restarts,
                                     make_runner=make_runner, **options)
    finally:
        for runner in runners:
            runner.close()
