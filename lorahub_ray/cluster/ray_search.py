"""LoraHub learning on a Ray cluster: W model-holding evaluator actors, a portfolio of restarts in lockstep.

Design (the README section "Distributed search on Ray" has the measured figures):

* ``W`` :class:`~lorahub_ray.cluster.evaluators.Evaluator` actors each load the base model once,
  take the stacked modules from the object store once and tokenise the examples once; they then
  answer one call per round for the whole run. They are created with ``max_restarts`` /
  ``max_task_retries``: one that dies is restarted by Ray and its call retried.
* By default the W workers run a portfolio of R = W restarts (:mod:`lorahub_ray.core.portfolio`),
  each a sequential search; restart 0 is exactly the one-process search, the others are
  diversified (permuted module orders, other seeds, optionally other optimizers). They advance in
  lockstep rounds in this driver (:mod:`lorahub_ray.cluster.restarts`): a fixed split of each round's
  candidates over the actors, so a run repeats exactly. The lowest objective wins.
* The driver saves the histories after every round (``<output>.search/restarts.json``); an
  interrupted run (SIGINT/SIGUSR1) resumes with ``resume=`` by replaying them.
* The winner is written with the core :func:`~lorahub_ray.core.learning.write_output`: ``recipe.json``
  (every restart recorded), ``adapter/``, ``history.parquet`` (one schema with the local search),
  ``search.png`` and, with ``merge``, the merged ``model/``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import ray

from lorahub_ray.cluster.connect import connect, default_cpus_per_worker
from lorahub_ray.core.families import check_template
from lorahub_ray.cluster.evaluators import Evaluator
from lorahub_ray.cluster.restarts import Restart, StopRequested, run_lockstep, start_restarts
from lorahub_ray.cluster.screening import screen_on_actors
from lorahub_ray.cluster.run_spec import (RUN_FILE, RunSpec, check_ray_options, normalise_output, read_spec, read_text,
                                          storage_root)
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.learning import load_module_list, make_recipe, now, write_output
from lorahub_ray.core.model import base_model_sha256, check_base_model, load_base_model
from lorahub_ray.core.modules import LoraModule, check_compatible, load_module
from lorahub_ray.core.objective import l1_regularization
from lorahub_ray.core.portfolio import RestartOutcome, best_outcome, plan_restarts
from lorahub_ray.core.preselect import check_k
from lorahub_ray.core.recipe import RECIPE_FILE, Recipe
from lorahub_ray.core.search import DEFAULT_BUDGET, DEFAULT_OPTIMIZER, algorithm_name
from lorahub_ray.core.settings import SearchSettings
from lorahub_ray.errors import LoraHubError
from lorahub_ray.io import storage
from lorahub_ray.io.examples import as_examples
from lorahub_ray.plots import plot_search
from lorahub_ray.progress import RestartsDisplay

PLOT_FILE = "search.png"


class ResourceError(LoraHubError):
    """The evaluator actors ask for more than the Ray cluster has."""


class SearchFailed(RuntimeError):
    """The search failed (an evaluator that cannot start or keeps dying, or the optimizer); carries its error."""


class SearchInterrupted(RuntimeError):
    """The driver was interrupted; the run can be resumed from its output directory."""

    def __init__(self, message: str, resume: str):
        super().__init__(message)
        self.resume = resume


@dataclass
class RayLoraHubResult:
    recipe: Recipe
    restarts: list[RestartOutcome]
    best: RestartOutcome
    model: object
    tokenizer: object
    output: Path | str | None
    storage: str
    seconds: float

    @property
    def weights(self) -> dict[str, float]:
        return self.recipe.module_weights


def check_resources(workers: int, cpus: float, gpus: float) -> None:
    """Fail before starting anything when the actors cannot fit the cluster."""
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if gpus > 0 and not any(n.get("GPU", 0.0) >= gpus for n in nodes):
        raise ResourceError(f"each evaluator asks for {gpus:g} GPU but no node of the cluster has that many "
                            f"(cluster GPUs: {have_gpu:g}); lower --gpus-per-worker or add GPU nodes")
    if gpus * workers > have_gpu + 1e-9:
        raise ResourceError(f"{workers} evaluators × {gpus:g} GPU = {gpus * workers:g} GPUs but the cluster has "
                            f"{have_gpu:g}; lower --workers or --gpus-per-worker (fractions such as 0.25 share a GPU)")
    if not any(n.get("CPU", 0.0) >= cpus for n in nodes):
        raise ResourceError(f"each evaluator asks for {cpus:g} CPUs but no node of the cluster has that many")
    if cpus * workers > have_cpu + 1e-9:
        raise ResourceError(f"{workers} evaluators × {cpus:g} CPUs = {cpus * workers:g} CPUs but the cluster has "
                            f"{have_cpu:g}; lower --workers or --cpus-per-worker")


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
    scheduler: str | None = None,
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
    """LoraHub learning on Ray: a portfolio of ``restarts`` (default ``workers``) sequential searches in
    lockstep over ``workers`` evaluator actors; the lowest objective wins.

    Arguments as :func:`lorahub_ray.lorahub_learning`, plus: ``address`` (None starts a local Ray;
    ``"auto"``, ``host:port`` or ``ray://...`` joins a cluster), resources per actor
    (``cpus_per_worker``, default an equal share of the cluster's CPUs up to 1; ``gpus_per_worker``,
    fractions share a GPU), ``modules_per_restart`` (a random subset of the hub per restart, the
    paper's protocol), ``portfolio`` (optimizer names cycled over restarts 1, 2, ...; restart 0 runs
    ``optimizer``), ``scheduler="asha"`` (halving: stop the worse half of the restarts at rungs),
    ``asks`` (candidates asked at once per restart, default 1; more trade quality for time),
    ``storage_path`` (the run's state, default ``<output>.search``) and ``resume`` (the output of an
    interrupted run: everything else is read from its state). ``preselect=k`` first scores every
    module alone on the actors (:mod:`lorahub_ray.cluster.screening`) and plans the restarts over
    the k best (recorded in ``recipe.search["preselect"]``). ``callback(event)`` is called after
    every evaluation with ``{"run", "restart", "evaluations", "best", "objective"}``. ``merge`` also
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
    else:
        spec, loaded, base_path = _new_spec(
            model, modules, examples, output=output, workers=workers, restarts=restarts,
            modules_per_restart=modules_per_restart, portfolio=portfolio, device=device, scheduler=scheduler,
            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, storage_path=storage_path,
            input_field=input_field, output_field=output_field, progress=progress, template=template,
            preselect=preselect, settings=SearchSettings(budget=budget, optimizer=optimizer, seed=seed, loss=loss, batch_size=batch_size,
                                    regularizer=regularizer, asks=asks or 1))
    hashing = ThreadPoolExecutor(1, thread_name_prefix="lorahub-hash")  # the recipe's base hash, while the search runs
    base_sha256 = hashing.submit(base_model_sha256, base_path)
    hashing.shutdown(wait=False)
    started_ray = connect(address)
    actors = []
    try:
        if spec.cpus_per_worker is None:
            spec.cpus_per_worker = default_cpus_per_worker(spec.workers)
        check_resources(spec.workers, spec.cpus_per_worker, spec.gpus_per_worker)
        spec.write()
        run_id = uuid.uuid4().hex[:8]
        # the driver holds the modules' object ref for the whole run: a restarted actor reads them again
        actors, modules_ref = _start_evaluators(spec, loaded, run_id, actor_restarts)
        wait_for_evaluators(actors, ready_timeout)
        _preselect(spec, actors)
        outcomes = _search(spec, actors, run_id, progress, callback)
        del modules_ref  # (held until here)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()
    return _finish(spec, loaded, outcomes, started, time.time() - started_at, base_sha256.result(), merge)


def _new_spec(model, modules, examples, *, output, workers, restarts, modules_per_restart, portfolio, device,
              scheduler, cpus_per_worker, gpus_per_worker, storage_path, input_field, output_field, progress,
              template: str, preselect: int | None, settings: SearchSettings) -> tuple[RunSpec, list[LoraModule], Path]:
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
                      portfolio=portfolio)
    storage.check_output(output, marker=RECIPE_FILE)  # a local directory or an s3:// prefix
    output = normalise_output(output)
    root = storage_root(output, storage_path)
    if read_text(root, RUN_FILE) is not None:
        raise LoraHubError(f"a search already ran in '{root}': resume it with --resume {output} or remove that directory")
    base_path = check_base_model(str(model))  # a wrong model fails here, not in every evaluator
    loaded = load_module_list(modules, progress)
    check_k(preselect, len(loaded))
    plans = plan_restarts(len(loaded), restarts, seed=settings.seed, optimizer=settings.optimizer_label,
                          portfolio=list(portfolio) if portfolio else None, modules_per_restart=modules_per_restart)
    spec = RunSpec(model=str(model), modules=[{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in loaded],
                   inputs=list(data.inputs), outputs=list(data.outputs), output=output, storage=root,
                   settings=settings, workers=workers, plans=plans, portfolio=list(portfolio) if portfolio else None,
                   modules_per_restart=modules_per_restart, cpus_per_worker=cpus_per_worker,
                   gpus_per_worker=gpus_per_worker, device=device, scheduler=scheduler or "fifo",
                   examples=None if data.source is None else str(data.source), template=template,
                   extra={} if preselect is None else {"preselect": {"k": preselect}})
    return spec, loaded, base_path


def _start_evaluators(spec: RunSpec, loaded, run_id: str, actor_restarts: int) -> tuple[list, object]:
    cpus, gpus = spec.cpus_per_worker, spec.gpus_per_worker
    device = spec.device or ("cuda" if gpus > 0 else "cpu")
    remote = ray.remote(Evaluator)
    options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=actor_restarts, max_task_retries=actor_restarts)
    modules_ref = ray.put(loaded)  # once into the object store; each actor (and a restarted one) reads it from there
    s = spec.settings
    actors = [remote.options(name=f"lorahub-evaluator-{run_id}-{i}", **options).remote(
        spec.model, modules_ref, spec.inputs, spec.outputs, loss=s.loss, batch_size=s.batch_size,
        regularizer=s.regularizer, device=device, threads=max(1, int(cpus)), template=spec.template)
        for i in range(spec.workers)]
    return actors, modules_ref


def _preselect(spec: RunSpec, actors: list) -> None:
    """With ``preselect``: screen the hub on the actors once (a resumed run keeps its screening), plan
    the restarts over the k best and save both in the run file."""
    asked = spec.extra.get("preselect")
    if asked is None or "chosen" in asked:
        return
    names = [m["name"] for m in spec.modules]
    screening = screen_on_actors(actors, names, asked["k"])
    s = spec.settings
    spec.plans = plan_restarts(len(names), spec.restarts, seed=s.seed, optimizer=s.optimizer_label,
                               portfolio=spec.portfolio, modules_per_restart=spec.modules_per_restart,
                               candidates=screening.chosen, start_ranking=screening.ranking())
    spec.extra["preselect"] = screening.to_recipe()
    spec.write()


def wait_for_evaluators(actors: list, timeout: float) -> None:
    """Wait until every evaluator has started, or fail once with the cause."""
    try:
        ray.get([a.ready.remote() for a in actors], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ResourceError(f"the {len(actors)} evaluators did not start within {timeout:g} s; the cluster may "
                            "lack the resources they ask for") from None
    except ray.exceptions.RayActorError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise SearchFailed(f"an evaluator failed to start: {_root_message(cause)}") from None


@contextlib.contextmanager
def _stop_on_signals():
    """SIGINT and SIGUSR1 ask the search to stop after the current round (its state saved); a second
    SIGINT interrupts at once. Yields a function telling whether a stop was asked for."""
    asked: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGUSR1)}

    def handler(signum, frame):
        if asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        asked.append(signum)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield lambda: bool(asked)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _search(spec: RunSpec, actors: list, run_id: str, progress: bool, callback) -> list[RestartOutcome]:
    s = spec.settings
    histories, stopped = spec.load_state()
    optimizers = {s.optimizer_label: s.optimizer}
    restarts = start_restarts(spec.plans, optimizers, budget=s.budget, asks=s.asks, histories=histories,
                              stopped=stopped)

    def save(restarts: list[Restart]) -> None:
        spec.save_state({r.plan.restart: r.history for r in restarts}, [r.plan.restart for r in restarts if r.stopped])

    with RestartsDisplay(spec.plans, s.budget, enabled=progress) as display:
        def on_evaluation(r: Restart, e) -> None:
            display.update(r.plan.restart, len(r.history), r.best, algorithm_name(r.opt))
            if callback is not None:
                callback({"run": run_id, "restart": r.plan.restart, "evaluations": len(r.history), "best": r.best,
                          "objective": e.objective})

        try:
            with _stop_on_signals() as stop_requested:
                return run_lockstep(restarts, actors, budget=s.budget, asks=s.asks, halving=spec.scheduler == "asha",
                                    on_evaluation=on_evaluation, save=save, stop_requested=stop_requested)
        except (StopRequested, KeyboardInterrupt):
            save(restarts)
            raise SearchInterrupted(f"the search was interrupted; its state is saved in {spec.storage}: resume it "
                                    f"with --resume {spec.output}", spec.output) from None
        except LoraHubError:
            raise
        except Exception as exc:  # noqa: BLE001 - the optimizer or an evaluator that keeps failing
            save(restarts)
            raise SearchFailed(f"the search failed with {type(exc).__name__}: {_root_message(exc)} (its state up to "
                               f"the last round is saved: --resume {spec.output})") from exc


def _root_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else repr(exc)


def describe_restarts(outcomes: list[RestartOutcome], names: list[str]) -> list[dict]:
    """What the recipe records of every restart (``search["restarts"]``)."""
    return [{"restart": o.restart, "seed": o.plan.seed, "optimizer": o.plan.optimizer, "algorithm": o.algorithm,
             "order": [names[i] for i in o.plan.modules], "objective": o.objective, "evaluations": len(o.history),
             "finished": o.finished} for o in outcomes]


def _finish(spec: RunSpec, loaded, outcomes: list[RestartOutcome], started: str, seconds: float,
            base_sha256: str, merge: bool = False) -> RayLoraHubResult:
    best = best_outcome(outcomes)
    indices, weights = best.canonical()
    chosen = [loaded[i] for i in indices]
    base, tokenizer, _ = load_base_model(spec.model, device=spec.device or "cpu")
    composer = LoraComposer(base, chosen)
    search = {"backend": "ray", "workers": spec.workers, "asks": spec.settings.asks,
              "modules_per_restart": spec.modules_per_restart, "portfolio": spec.portfolio,
              "scheduler": spec.scheduler, "cpus_per_worker": spec.cpus_per_worker,
              "gpus_per_worker": spec.gpus_per_worker, "storage": spec.storage, "best_restart": best.restart,
              "seconds": seconds, **({"preselect": spec.extra["preselect"]} if "preselect" in spec.extra else {}),
              "restarts": describe_restarts(outcomes, [m.name for m in loaded])}
    recipe = make_recipe(model=spec.model, base_sha256=base_sha256, modules=chosen, weights=weights,
                         objective=best.objective, optimizer=best.plan.optimizer, algorithm=best.algorithm,
                         seed=best.plan.seed, settings=spec.settings, merge_method=composer.merge_method,
                         num_examples=len(spec.inputs), started=started, search=search, template=spec.template)
    merged = composer.merge_and_unload(weights)
    out = write_output(spec.output, recipe, chosen, merged=(merged, tokenizer) if merge else None,
                       history=(outcomes, loaded),
                       extra=lambda directory: plot_search(directory / PLOT_FILE, outcomes, recipe))
    return RayLoraHubResult(recipe=recipe, restarts=outcomes, best=best, model=merged, tokenizer=tokenizer, output=out,
                            storage=spec.storage, seconds=seconds)

