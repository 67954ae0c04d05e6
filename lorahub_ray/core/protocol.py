"""The paper's protocol in one run: many tasks, each with S restarts over random K-subsets of one hub.

The base model and the whole hub are loaded once for all tasks. For each task (one few-shot file,
named by its stem) a :class:`TaskRunner` runs the task's restarts and writes its output
(``DIR/<task>/``: recipe, adapter, history, and the merged model with ``merge``, through
:func:`lorahub_ray.core.learning.write_output`);
:func:`run_tasks` drives the tasks, keeps going when one fails, and keeps ``DIR/summary.json`` up to
date after every task (per task: status, objective, winning restart, seconds, error).

:class:`LocalRunner` is the one-process runner: restart ``r`` searches with seed ``seed + r`` the
modules that :func:`lorahub_ray.core.portfolio.plan_restarts` gives it (all of them, a random
subset of ``modules_per_restart``, or one drawn from the ``preselect`` best; restarts after the
first in a permuted order), sequentially, with every prompt rendered by ``template``; the lowest
objective wins. The plans are those of the runner on Ray, so both search the same restarts. A runner on Ray can take its place: :func:`run_tasks` needs only ``search`` and
``write``.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.learning import load_module_list, now, write_output
from lorahub_ray.core import portfolio
from lorahub_ray.core.portfolio import RestartOutcome, best_outcome
from lorahub_ray.core.templates import check_template
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.modules import LoraModule
from lorahub_ray.core.objective import LOSSES, FewShotObjective, LossFn, l1_regularization
from lorahub_ray.core.preselect import Screening, check_k, hub_size, screen_and_choose
from lorahub_ray.core.recipe import RECIPE_FILE, Recipe
from lorahub_ray.core.search import check_optimizer, minimize
from lorahub_ray.errors import DataError, LoraHubError
from lorahub_ray.io import storage
from lorahub_ray.io.examples import Examples, read_examples
from lorahub_ray.progress import progress_bar

SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT = "lorahub-ray/tasks/v1"


@dataclass
class TaskSearch:
    """One task's restarts, and the screening its modules came from (with ``preselect``)."""

    restarts: list[RestartOutcome]  # the weights of each in the order of its plan's modules
    screening: Screening | None = None
    started: str = ""

    @property
    def best(self) -> RestartOutcome:
        """The lowest objective; a tie goes to the earlier restart."""
        return best_outcome(self.restarts)


class TaskRunner(Protocol):
    """What :func:`run_tasks` needs from an engine: run one task's restarts, and write its output."""

    restarts: int

    def search(self, task: str, examples: Examples, advance: Callable[..., None]) -> TaskSearch: ...

    def write(self, task: str, examples: Examples, search: TaskSearch, output: str) -> str: ...


@dataclass
class TaskFile:
    name: str  # the file's stem: DIR/<name>/
    uri: str
    examples: Examples | None = None
    error: str | None = None  # why the file cannot be used (the task is reported as failed)


def read_tasks(files: Sequence[tuple[str, str]], *, input_field: str = "input",
               output_field: str = "output") -> list[TaskFile]:
    """Read and check every task's file before any model loads. Two files for one task name are an
    error; a malformed file makes its task fail (with the error naming file and row), not the run."""
    seen: dict[str, str] = {}
    tasks = []
    for name, uri in files:
        if name in seen:
            raise DataError(f"two files for task '{name}': {seen[name]} and {uri}")
        seen[name] = uri
        try:
            tasks.append(TaskFile(name, uri, read_examples(uri, input_field=input_field, output_field=output_field)))
        except LoraHubError as exc:
            tasks.append(TaskFile(name, uri, error=str(exc)))
    if not tasks:
        raise DataError("no task files")
    return tasks


def task_output(output: str, task: str) -> str:
    return f"{str(output).rstrip('/')}/{task}"


def check_outputs(output: str, tasks: Sequence[TaskFile]) -> None:
    """``output`` is new, empty or an earlier run's (it holds ``summary.json``), and no task's
    directory holds anything but an earlier output: nothing the user saved is overwritten."""
    storage.check_output(output, marker=SUMMARY_FILE)
    for task in tasks:
        storage.check_output(task_output(output, task.name), marker=RECIPE_FILE)


def write_summary(output: str, summary: dict) -> None:
    """``DIR/summary.json``, replaced in one step (a rename locally; one object put on S3)."""
    storage.write_json(f"{str(output).rstrip('/')}/{SUMMARY_FILE}", summary)


def run_tasks(tasks: Sequence[TaskFile], runner: TaskRunner, output: str, *, settings: dict | None = None,
              progress: bool = True) -> dict:
    """Run every task with ``runner`` and write ``DIR/<task>/`` and ``DIR/summary.json``; a task that
    fails (bad file, or an error in its search or output) is recorded with its cause and the others
    still run. Returns the summary."""
    started, clock = now(), time.perf_counter()
    rows = [{"task": t.name, "file": t.uri, "status": "pending", "objective": None, "restart": None, "seed": None,
             "modules": None, "restarts": [], "seconds": None, "output": None, "error": None} for t in tasks]
    summary = {"format": SUMMARY_FORMAT, **(settings or {}), "started": started, "finished": None, "tasks": rows}
    write_summary(output, summary)
    with progress_bar("tasks × restarts", len(tasks) * runner.restarts, enabled=progress) as advance:
        for task, row in zip(tasks, rows):
            task_clock = time.perf_counter()
            done = 0

            def step(**fields):
                nonlocal done
                done += 1
                advance(**fields)

            try:
                if task.error is not None:
                    raise DataError(task.error)
                search = runner.search(task.name, task.examples, step)
                best = search.best
                path = runner.write(task.name, task.examples, search, task_output(output, task.name))
                row.update(status="ok", objective=best.objective, restart=best.restart, seed=best.plan.seed,
                           modules=len(best.plan.modules), restarts=[o.objective for o in search.restarts],
                           output=str(path))
            except Exception as exc:  # one task's failure never ends the run
                message = str(exc) if isinstance(exc, LoraHubError) else f"{type(exc).__name__}: {exc}"
                row.update(status="failed", error=message)
            row["seconds"] = time.perf_counter() - task_clock
            if done < runner.restarts:
                advance(runner.restarts - done, info=f"{task.name}: {row['status']}")
            write_summary(output, summary)
    summary.update(finished=now(), seconds=time.perf_counter() - clock)
    write_summary(output, summary)
    return summary


def merged_copy(composer: LoraComposer, weights: Sequence[float]):
    """The base model with the composition ``weights`` merged in, as a copy: the composer keeps its
    model and can serve the next task."""
    composer.compose(weights)
    return copy.deepcopy(composer.model).merge_and_unload()


@dataclass
class LocalRunner:
    """Restarts in this process, on one loaded base model and hub (a :class:`TaskRunner`)."""

    composer: LoraComposer
    tokenizer: object
    base_model: str
    base_model_sha256: str
    budget: int = 40
    optimizer: str = "NGOpt"
    seed: int = 42
    restarts: int = 1
    modules_per_restart: int | None = None
    preselect: int | None = None
    loss: str | LossFn = "reference"
    batch_size: int | None = None
    regularizer: Callable[[Sequence[float]], float] = l1_regularization
    template: str = "plain"
    merge: bool = False  # also write each task's merged model/
    extra: dict = field(default_factory=dict)  # more for recipe.search

    def __post_init__(self):
        check_k(self.preselect, self.composer.num_modules)

    @property
    def modules(self) -> list[LoraModule]:
        return self.composer.modules

    def search(self, task: str, examples: Examples, advance: Callable[..., None]) -> TaskSearch:
        started = now()
        objective = FewShotObjective(self.composer, self.tokenizer, examples.inputs, examples.outputs, loss=self.loss,
                                     batch_size=self.batch_size, regularizer=self.regularizer, template=self.template)
        screening = None
        if self.preselect is not None:
            screening = screen_and_choose(objective, [m.name for m in self.modules], self.preselect)
        plans = portfolio.plan_restarts(len(self.modules), self.restarts, seed=self.seed, optimizer=self.optimizer,
                                        modules_per_restart=self.modules_per_restart,
                                        candidates=screening.chosen if screening is not None else None,
                                        start_ranking=screening.ranking() if screening is not None else None)
        outcomes = []
        for plan in plans:  # the plans of the Ray runner too: the same restarts, one after the other
            with self._scope(plan.modules):  # exactly the search given the restart's modules directly
                result = minimize(objective, len(plan.modules), budget=self.budget, optimizer=plan.optimizer,
                                  seed=plan.seed, init=plan.init())
            outcomes.append(RestartOutcome(plan, result.weights, result.objective, result.algorithm, True,
                                           result.history))
            best = min(o.objective for o in outcomes)
            advance(info=f"{task}: restart {plan.restart + 1}/{self.restarts}, best {best:.4f}")
        return TaskSearch(outcomes, screening, started)

    def _scope(self, modules: list[int]):
        whole = list(modules) == list(range(len(self.modules)))
        return contextlib.nullcontext() if whole else self.composer.restrict(modules)

    def recipe(self, examples: Examples, search: TaskSearch) -> Recipe:
        best = search.best
        indices, weights = best.canonical()
        modules = [self.modules[i] for i in indices]
        regularizer = self.regularizer
        described = {
            "backend": "local", "asks": 1, "restarts": self.restarts, "modules_per_restart": self.modules_per_restart,
            "winner": best.restart,
            "trials": [{"restart": o.restart, "seed": o.plan.seed, "modules": [self.modules[i].name for i in o.plan.modules],
                        "objective": o.objective, "algorithm": o.algorithm,
                        "seconds": o.history[-1].wall if o.history else 0.0}
                       for o in search.restarts],
            **self.extra,
        }
        if search.screening is not None:
            described["preselect"] = search.screening.to_recipe()
        return Recipe(
            base_model=self.base_model, base_model_sha256=self.base_model_sha256,
            modules=[{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in modules],
            weights=weights, objective=best.objective, optimizer=best.plan.optimizer,
            algorithm=best.algorithm, budget=self.budget, seed=best.plan.seed,
            loss=self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "custom"),
            batch_size=self.batch_size,
            regularizer="l1(0.05)" if regularizer is l1_regularization else getattr(regularizer, "__name__", "custom"),
            merge_method=self.composer.merge_method, num_examples=len(examples), started=search.started,
            finished=now(), search=described, template=self.template)

    def write(self, task: str, examples: Examples, search: TaskSearch, output: str) -> str:
        best = search.best
        merged = None
        if self.merge:
            with self._scope(best.plan.modules):
                merged = merged_copy(self.composer, best.weights), self.tokenizer
        recipe = self.recipe(examples, search)
        return str(write_output(output, recipe, [self.modules[i] for i in best.canonical()[0]], merged=merged,
                                history=(search.restarts, self.modules)))


def run_protocol(model: str, modules: Sequence[str | LoraModule], files: Sequence[tuple[str, str]], *, output: str,
                 budget: int = 40, optimizer: str = "NGOpt", seed: int = 42, restarts: int = 1,
                 modules_per_restart: int | None = None, preselect: int | None = None,
                 loss: str | LossFn = "reference", batch_size: int | None = None, input_field: str = "input",
                 output_field: str = "output", device: str | None = None, template: str = "plain",
                 merge: bool = False, progress: bool = True,
                 make_runner: Callable[..., TaskRunner] | None = None) -> dict:
    """LoraHub learning on every task of ``files`` (``(name, uri)`` pairs, one few-shot file per task)
    with one loaded base model and hub: ``DIR/<name>/`` per task (with ``merge``, its ``model/`` too) and
    ``DIR/summary.json``.

    Everything that can be checked cheaply is checked before any model loads: the options, every
    task's file (a malformed one fails its task only), the outputs (nothing the user saved is
    overwritten) and, with ``preselect``, the size of the hub. ``make_runner(loaded_modules,
    **options)`` builds another :class:`TaskRunner` (such as one on Ray); the default loads the base
    model here and runs :class:`LocalRunner`."""
    check_optimizer(optimizer)
    if budget < 1:
        raise LoraHubError(f"budget must be at least 1, got {budget}")
    if isinstance(loss, str) and loss not in LOSSES:
        raise LoraHubError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    portfolio.plan_restarts(1, restarts, seed=seed, optimizer=optimizer,
                            modules_per_restart=modules_per_restart)  # checks restarts and modules_per_restart
    check_template(template)
    check_k(preselect)
    tasks = read_tasks(files, input_field=input_field, output_field=output_field)
    check_outputs(output, tasks)
    if preselect is not None:
        check_k(preselect, hub_size(modules))
    loaded = load_module_list(modules, progress)
    options = dict(budget=budget, optimizer=optimizer, seed=seed, restarts=restarts,
                   modules_per_restart=modules_per_restart, preselect=preselect, loss=loss, batch_size=batch_size,
                   template=template, merge=merge)
    if make_runner is not None:
        runner = make_runner(loaded, model=model, device=device, **options)
    else:
        base, tokenizer, base_path = load_base_model(model, device=device)
        check_template(template, tokenizer)
        runner = LocalRunner(LoraComposer(base, loaded), tokenizer, str(model), storage.sha256_dir(base_path),
                             **options)
    settings = {"base_model": str(model), "modules": len(loaded),
                **{k: (v if isinstance(v, (str, int, type(None))) else getattr(v, "__name__", "custom"))
                   for k, v in options.items()}}
    return run_tasks(tasks, runner, output, settings=settings, progress=progress)
