"""LoraHub learning on a Ray cluster: model-holding evaluator actors, searches as Ray Tune trials.

Design (see the README section "Distributed search on Ray Tune" for the measured overhead):

* ``W`` :class:`Evaluator` actors each load the base model once, take the stacked modules from
  the object store once, and tokenise the examples once; they then answer
  ``evaluate_many(candidates, indices)`` calls for the whole run (an actor's share of a batch in
  one call, sharing forward passes). An actor is created with ``max_restarts``/``max_task_retries``, so
  one that dies is restarted by Ray and the calls it had in flight are retried on it.
* One Tune trial is one whole coefficient search (a *restart*: its own seed and, with
  ``modules_per_restart``, its own random subset of the hub). A trial does not hold a model: it
  runs nevergrad's ask/tell loop (the core :func:`~lorahub_ray.core.search.minimize`), sends the
  candidates of each batch to the actors in parallel, ``tune.report``\\s after every evaluation
  (so ASHA can stop a hopeless restart) and checkpoints the optimizer and its history after
  every batch (so an interrupted run resumes without repeating told evaluations). One trial per
  candidate would cost about a second of Tune orchestration per evaluation; one trial per search
  costs it once.
* The driver picks the best trial, merges its weights into the base model and writes the output
  with the core :func:`~lorahub_ray.core.learning.write_output`, plus ``history.parquet`` for all trials
  and ``search.png``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ray import tune

from lorahub_ray.io import storage
from lorahub_ray.errors import LoraHubError, LoraHubWarning
from lorahub_ray.core.objective import LOSSES, l1_regularization
from lorahub_ray.cluster.connect import connect, default_cpus_per_worker
from lorahub_ray.core.families import check_template
from lorahub_ray.cluster.evaluators import Evaluator
from lorahub_ray.core.recipe import HISTORY_FILE, RECIPE_FILE, Recipe
from lorahub_ray.core.search import DEFAULT_BUDGET, DEFAULT_OPTIMIZER, Evaluation, SearchResult, check_optimizer, optimizer_label

RUN_FILE = "lorahub-run.json"
EXPERIMENT = "search"
STATE_FILE = "search.pkl"
PLOT_FILE = "search.png"
TRIAL_CPUS = 0.01  # a trial only runs the optimizer; Tune cannot schedule a trial on 0 CPUs


class ResourceError(LoraHubError):
    """The evaluator actors ask for more than the Ray cluster has."""


class SearchFailed(RuntimeError):
    """A trial of the search failed (for example inside the optimizer); carries its error."""


class SearchInterrupted(RuntimeError):
    """The driver was interrupted; the run can be resumed from its experiment directory."""

    def __init__(self, message: str, resume: str):
        super().__init__(message)
        self.resume = resume


# --- one trial: one coefficient search -----------------------------------------------------------


def _trial(config: dict, *, evaluators: list, spec: dict, optimizer=None) -> None:
    """A Tune function trainable: one restart of the search, resumable from its checkpoint."""
    import tempfile

    import ray

    from lorahub_ray.core.search import algorithm_name, make_optimizer, minimize

    restart = config["restart"]
    plan = spec["trials"][restart]
    seed, indices = plan["seed"], plan["modules"]
    optimizer = optimizer if optimizer is not None else spec["optimizer"]
    budget, asks, workers = spec["budget"], spec["asks"], len(evaluators)
    error = wait_for_evaluators(evaluators, spec.get("ready_timeout", 600.0))
    if error is not None:
        tune.report({"restart": restart, "startup_error": error["message"], "startup_error_kind": error["kind"],
                     "evaluations": 0, "best": math.inf, "done": True})
        return
    history = []
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = pickle.loads((Path(directory) / STATE_FILE).read_bytes())
        if state.get("result") is not None:  # finished before the interruption: report it again
            _report_final(state["result"], restart, plan, history=state["result"].history)
            return
        history = state["history"]
    opt = make_optimizer(optimizer, len(indices), budget=budget, seed=seed, num_workers=asks)
    replay(opt, history, asks)
    started = time.time() - (history[-1].wall if history else 0.0)
    sent = [len(history)]

    def submit_batch(candidates: list[list[float]]):
        # spread over the actors, trials shifted so that restarts share them; an actor's share of the
        # batch goes in one call and shares its forward passes (a fixed split: reproducible)
        shares: dict[int, list[int]] = {}
        for j in range(len(candidates)):
            shares.setdefault((restart + sent[0] + j) % workers, []).append(j)
        sent[0] += len(candidates)
        calls = [(js, evaluators[a].evaluate_many.remote([candidates[j] for j in js], indices))
                 for a, js in shares.items()]

        def collect() -> list[float]:
            values = [0.0] * len(candidates)
            for js, part in zip((js for js, _ in calls), ray.get([ref for _, ref in calls])):
                for j, v in zip(js, part):
                    values[j] = v
            return values

        return collect

    pending: list[tuple[Evaluation, float]] = []

    def on_evaluation(e: Evaluation, best: float) -> None:
        e.trial, e.wall = restart, time.time() - started
        pending.append((e, best))

    def on_batch(opt, history) -> None:
        algorithm = algorithm_name(opt)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / STATE_FILE).write_bytes(pickle.dumps({"history": history, "result": None}))
            for i, (e, best) in enumerate(pending):
                metrics = {"restart": restart, "seed": seed, "evaluations": e.step + 1, "objective": e.objective,
                           "best": best, "seconds": e.seconds, "algorithm": algorithm, "done": False}
                last = i == len(pending) - 1
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp) if last else None)
        pending.clear()

    # the report and checkpoint of a batch overlap the evaluation of the next one
    result = minimize(lambda w: submit_batch([w])()[0], len(indices), budget=budget, optimizer=optimizer, seed=seed,
                      submit_batch=submit_batch, num_workers=asks, callback=on_evaluation, opt=opt,
                      history=history, on_batch=on_batch)
    for e in result.history:
        e.trial = restart
    _report_final(result, restart, plan, history=result.history)


def replay(opt, history: list[Evaluation], asks: int) -> None:
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


def _report_final(result: SearchResult, restart: int, plan: dict, *, history) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / STATE_FILE).write_bytes(pickle.dumps({"history": history, "result": result}))
        best = min((e.objective for e in history), default=result.objective)
        tune.report({"restart": restart, "seed": plan["seed"], "evaluations": len(history), "objective": result.objective,
                     "best": min(best, result.objective), "seconds": 0.0, "algorithm": result.algorithm, "done": True,
                     "final_objective": result.objective},
                    checkpoint=tune.Checkpoint.from_directory(tmp))


# --- the driver ----------------------------------------------------------------------------------


@dataclass
class TrialOutcome:
    restart: int
    seed: int
    modules: list[int]
    weights: list[float]
    objective: float
    algorithm: str
    finished: bool  # False when a scheduler stopped it early: its best evaluated point stands
    history: list[Evaluation] = field(default_factory=list)


@dataclass
class RayLoraHubResult:
    recipe: Recipe
    trials: list[TrialOutcome]
    best: TrialOutcome
    model: object
    tokenizer: object
    output: Path | None
    experiment: str
    seconds: float

    @property
    def weights(self) -> dict[str, float]:
        return self.recipe.module_weights


def plan_restarts(num_modules: int, restarts: int, modules_per_restart: int | None, seed: int) -> list[dict]:
    """Seeds ``seed, seed+1, ...``; with ``modules_per_restart`` a sorted random subset per restart."""
    plans = []
    rng = np.random.RandomState(seed)
    for r in range(restarts):
        if modules_per_restart is None or modules_per_restart >= num_modules:
            subset = list(range(num_modules))
        else:
            subset = sorted(int(i) for i in rng.choice(num_modules, modules_per_restart, replace=False))
        plans.append({"seed": seed + r, "modules": subset})
    return plans


def default_asks(workers: int, concurrent: int) -> int:
    """Candidates asked at once per trial: enough to keep the actors busy across concurrent trials."""
    return max(1, math.ceil(workers / max(1, concurrent)))


def check_resources(workers: int, cpus: float, gpus: float, trials: int) -> None:
    """Fail before starting anything when the actors (plus the trials) cannot fit the cluster."""
    import ray

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
    need = cpus * workers + TRIAL_CPUS * trials
    if need > have_cpu + 1e-9:
        raise ResourceError(f"{workers} evaluators × {cpus:g} CPUs + {trials} trials × {TRIAL_CPUS} CPU = {need:g} CPUs "
                            f"but the cluster has {have_cpu:g}; lower --workers or --cpus-per-worker")


def _label(value) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", "custom")


def _storage_path(output: str, storage_path: str | None) -> str:
    """Tune's experiment storage: ``storage_path``, else ``<output>.tune`` beside the output (on S3
    for an ``s3://`` output, so that every node of a cluster reaches it)."""
    if storage_path:
        return storage_path if storage.is_remote(storage_path) else str(Path(storage_path).expanduser().resolve())
    return output.rstrip("/") + ".tune"


def _read_spec(resume: str | Path) -> tuple[dict, str]:
    import fsspec

    resume = str(resume)
    if storage.is_remote(resume):
        candidates = [resume.rstrip("/"), resume.rstrip("/") + ".tune"]
    else:
        candidates = [resume, str(Path(resume).expanduser().resolve().with_name(Path(resume).name + ".tune"))]
    for root in candidates:
        uri = root.rstrip("/") + "/" + RUN_FILE
        fs, path = fsspec.core.url_to_fs(uri)
        if fs.exists(path):
            with fs.open(path, "r") as fh:
                return json.load(fh), root
    raise LoraHubError(f"no search to resume at '{resume}': no {RUN_FILE} there or in '{candidates[-1]}'")


def _write_spec(root: str, spec: dict) -> None:
    import fsspec

    fs, path = fsspec.core.url_to_fs(root.rstrip("/") + "/" + RUN_FILE)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "w") as fh:
        json.dump(spec, fh, indent=2)


def lorahub_learning_ray(
    model: str | None = None,
    modules: Sequence[str] | None = None,
    examples=None,
    *,
    output: str | Path | None = None,
    workers: int = 2,
    restarts: int = 1,
    modules_per_restart: int | None = None,
    budget: int = DEFAULT_BUDGET,
    optimizer=DEFAULT_OPTIMIZER,
    seed: int = 42,
    loss: str = "reference",
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
    max_failures: int = 2,
    actor_restarts: int = 3,
    ready_timeout: float = 600.0,
    progress: bool = True,
    callback: Callable[[dict], None] | None = None,
    template: str = "plain",
) -> RayLoraHubResult:
    """LoraHub learning on Ray: ``restarts`` searches as Ray Tune trials over ``workers`` evaluator actors.

    Arguments as :func:`lorahub_ray.lorahub_learning`, plus: ``address`` (None starts a local Ray;
    ``"auto"``, ``host:port`` or ``ray://...`` joins a cluster), resources per actor
    (``cpus_per_worker``, default an equal share of the cluster's CPUs up to 1; ``gpus_per_worker``,
    fractions share a GPU), ``modules_per_restart`` (a random subset of the hub per restart, as the
    paper's protocol), ``scheduler="asha"`` (stop hopeless restarts early), ``asks`` (candidates
    evaluated at once per trial; default ``ceil(workers / restarts)``), ``storage_path`` (Tune's
    experiment storage, default ``<output>.tune``; shared storage such as ``s3://`` on a multi-node
    cluster) and ``resume`` (an output or experiment directory of an interrupted run: everything
    else is read from it). ``callback(event)`` is called on the driver after every reported
    evaluation with ``{"run", "restart", "evaluations", "best", "objective"}``.
    """
    started_at = time.time()
    from lorahub_ray.core.learning import now

    started = now()
    if resume is not None:
        spec, root = _read_spec(resume)
        spec["resumed"] = spec.get("resumed", 0) + 1
    else:
        spec, root = _new_spec(model, modules, examples, output=output, workers=workers, restarts=restarts,
                               modules_per_restart=modules_per_restart, budget=budget, optimizer=optimizer, seed=seed,
                               loss=loss, batch_size=batch_size, regularizer=regularizer, input_field=input_field,
                               output_field=output_field, cpus_per_worker=cpus_per_worker,
                               gpus_per_worker=gpus_per_worker, device=device, scheduler=scheduler, asks=asks,
                               storage_path=storage_path, max_failures=max_failures)
        spec["template"] = check_template(template)
    if resume is not None and any(spec.get(k) == "<custom>" for k in ("optimizer", "loss", "regularizer")):
        raise LoraHubError("this run used a custom optimizer, loss or regularizer (Python objects): "
                           "pass them again through the Python API to resume it")
    custom = {"optimizer": optimizer if not isinstance(optimizer, str) else None,
              "loss": loss if not isinstance(loss, str) else None,
              "regularizer": regularizer if regularizer is not l1_regularization else None}
    from lorahub_ray.core.model import base_model_sha256, check_base_model

    base_path = check_base_model(spec["model"])  # a wrong model fails here, not in every evaluator
    from concurrent.futures import ThreadPoolExecutor

    hashing = ThreadPoolExecutor(1, thread_name_prefix="lorahub-hash")  # the recipe's base hash, while the search runs
    base_sha256 = hashing.submit(base_model_sha256, base_path)
    hashing.shutdown(wait=False)
    loaded = _load_spec_modules(spec, progress)
    if resume is None:
        note = restarts_warning(custom["optimizer"] or spec["optimizer"], len(loaded), budget=spec["budget"],
                                asks=spec["asks"], restarts=spec["restarts"],
                                modules_per_restart=spec["modules_per_restart"])
        if note:
            warnings.warn(note, LoraHubWarning, stacklevel=2)
    started_ray = connect(address)
    actors = []
    try:
        if spec["cpus_per_worker"] is None:
            spec["cpus_per_worker"] = default_cpus_per_worker(spec["workers"], reserved=TRIAL_CPUS * spec["restarts"])
        check_resources(spec["workers"], spec["cpus_per_worker"], spec["gpus_per_worker"], spec["restarts"])
        if resume is None:
            _write_spec(root, spec)
        run_id = uuid.uuid4().hex[:8]
        # the driver holds the modules' object ref for the whole run: a restarted actor reads them again
        actors, modules_ref = _start_evaluators(spec, loaded, custom, run_id, actor_restarts)
        grid, experiment = _run_tune(spec, root, actors, custom, run_id, progress, callback, resume is not None,
                                     ready_timeout)
        outcomes = _collect(grid, spec, experiment, custom["optimizer"] or spec["optimizer"])
    finally:
        import ray

        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started_ray:
            ray.shutdown()
    return _finish(spec, loaded, outcomes, experiment, started, time.time() - started_at, custom, base_sha256.result())


def _new_spec(model, modules, examples, *, output, workers, restarts, modules_per_restart, budget, optimizer, seed,
              loss, batch_size, regularizer, input_field, output_field, cpus_per_worker, gpus_per_worker, device,
              scheduler, asks, storage_path, max_failures) -> tuple[dict, str]:
    from lorahub_ray.io.examples import as_examples

    if model is None or not modules or examples is None or output is None:
        raise LoraHubError("model, modules, examples and output are required (or resume=DIR)")
    data = as_examples(examples, input_field=input_field, output_field=output_field)
    check_optimizer(optimizer)
    for name, value, least in (("budget", budget, 1), ("workers", workers, 1), ("restarts", restarts, 1)):
        if value < least:
            raise LoraHubError(f"{name} must be at least {least}, got {value}")
    if modules_per_restart is not None and modules_per_restart < 1:
        raise LoraHubError(f"modules per restart must be at least 1, got {modules_per_restart}")
    if isinstance(loss, str) and loss not in LOSSES:
        raise LoraHubError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)}")
    if scheduler not in (None, "fifo", "asha"):
        raise LoraHubError(f"unknown scheduler {scheduler!r}; choose 'asha' or 'fifo'")
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise LoraHubError(f"cpus per worker must be positive, got {cpus_per_worker}")
    if gpus_per_worker < 0:
        raise LoraHubError(f"gpus per worker must not be negative, got {gpus_per_worker}")
    if asks is not None and asks < 1:
        raise LoraHubError(f"asks must be at least 1, got {asks}")
    storage.check_output(output, marker=RECIPE_FILE)  # a local directory or an s3:// prefix
    output = str(output).rstrip("/") if storage.is_remote(str(output)) else str(Path(output).expanduser().resolve())
    root = _storage_path(output, storage_path)
    import fsspec

    fs, path = fsspec.core.url_to_fs(root.rstrip("/") + "/" + EXPERIMENT)
    if fs.exists(path):
        raise LoraHubError(f"a search already ran in '{root}': resume it with --resume {output} or remove that directory")
    from lorahub_ray.core.modules import LoraModule

    spec = {
        "model": str(model), "modules": [m.uri if isinstance(m, LoraModule) else str(m) for m in modules], "inputs": data.inputs, "outputs": data.outputs,
        "examples": data.source, "output": output, "workers": workers, "restarts": restarts,
        "modules_per_restart": modules_per_restart, "budget": budget,
        "optimizer": optimizer if isinstance(optimizer, str) else "<custom>", "optimizer_label": optimizer_label(optimizer),
        "seed": seed, "loss": loss if isinstance(loss, str) else "<custom>", "loss_label": _label(loss),
        "regularizer": "l1(0.05)" if regularizer is l1_regularization else "<custom>",
        "batch_size": batch_size, "cpus_per_worker": cpus_per_worker, "gpus_per_worker": gpus_per_worker,
        "device": device, "scheduler": scheduler or "fifo", "asks": asks or default_asks(workers, restarts),
        "max_failures": max_failures, "storage": root,
    }
    if all(isinstance(m, LoraModule) for m in modules):  # already loaded (e.g. from a hub catalogue)
        spec["module_entries"] = [{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in modules]
        spec["trials"] = plan_restarts(len(modules), restarts, modules_per_restart, seed)
    return spec, root


# nevergrad algorithms that do not draw random numbers: from the same start (0), any seed gives the same search
SEEDLESS_ALGORITHMS = ("Cobyla", "Powell", "NelderMead", "SQP", "BFGS", "LBFGSB")


def restarts_warning(optimizer, dim: int, *, budget: int, asks: int, restarts: int,
                     modules_per_restart: int | None) -> str | None:
    """A warning when the restarts would all run the same search: every restart on all the modules
    and an optimizer (or NGOpt's choice for this size) that does not use its seed."""
    if restarts < 2 or modules_per_restart is not None:
        return None
    from lorahub_ray.core.search import algorithm_name, make_optimizer

    try:
        algorithm = algorithm_name(make_optimizer(optimizer, dim, budget=budget, seed=0, num_workers=asks))
    except Exception:  # noqa: BLE001 - a custom optimizer that cannot be built here: no warning
        return None
    if not any(name in algorithm for name in SEEDLESS_ALGORITHMS):
        return None
    return (f"the {restarts} restarts differ only by their seed, but {optimizer_label(optimizer)} runs {algorithm} "
            f"here ({dim} weights, budget {budget}, {asks} ask(s) at a time), which does not use the seed: they "
            "will repeat the same search. Give each restart a random subset of the modules (modules_per_restart, "
            "the paper's protocol) or choose a stochastic optimizer.")


def _load_spec_modules(spec: dict, progress: bool):
    from lorahub_ray.core.learning import load_module_list
    from lorahub_ray.core.modules import check_compatible, load_module

    if "module_entries" in spec:  # a resumed run: the same modules, unchanged
        loaded = [load_module(m["uri"], m["name"], expected_sha256=m["sha256"]) for m in spec["module_entries"]]
        check_compatible(loaded)
    else:
        loaded = load_module_list(spec["modules"], progress)
        spec["module_entries"] = [{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in loaded]
        spec["trials"] = plan_restarts(len(loaded), spec["restarts"], spec["modules_per_restart"], spec["seed"])
    return loaded


def _start_evaluators(spec, loaded, custom, run_id, actor_restarts):
    import ray

    cpus, gpus = spec["cpus_per_worker"], spec["gpus_per_worker"]
    device = spec["device"] or ("cuda" if gpus > 0 else "cpu")
    remote = ray.remote(Evaluator)
    options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=actor_restarts, max_task_retries=actor_restarts)
    modules_ref = ray.put(loaded)  # once into the object store; each actor (and a restarted one) reads it from there
    loss = custom["loss"] or spec["loss"]
    regularizer = custom["regularizer"] or l1_regularization
    actors = [remote.options(name=f"lorahub-evaluator-{run_id}-{i}", **options).remote(
        spec["model"], modules_ref, spec["inputs"], spec["outputs"], loss=loss, batch_size=spec["batch_size"],
        regularizer=regularizer, device=device, threads=max(1, int(cpus)), template=spec.get("template", "plain"))
        for i in range(spec["workers"])]
    # no waiting here: the actors start (import torch, load the model) while Tune starts its trials,
    # and each trial waits for them first (see wait_for_evaluators)
    return actors, modules_ref


def wait_for_evaluators(evaluators: list, timeout: float) -> dict | None:
    """Wait until every evaluator has started; ``None``, or what went wrong as ``{"kind", "message"}``
    (reported by the trial as its final result, so that Tune does not retry a start that cannot work)."""
    import ray

    try:
        ray.get([a.ready.remote() for a in evaluators], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        return {"kind": "resources", "message": f"the {len(evaluators)} evaluators did not start within {timeout:g} s; "
                                                "the cluster may lack the resources they ask for"}
    except ray.exceptions.RayActorError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        return {"kind": "start", "message": f"an evaluator failed to start: {_root_message(cause)}"}
    return None


def _raise_startup_error(error: dict) -> None:
    if error["kind"] == "resources":
        raise ResourceError(error["message"])
    raise SearchFailed(error["message"])


class _Display:
    """A live per-restart display: evaluations done, best objective, evaluations per second."""

    def __init__(self, spec: dict, enabled: bool):
        self.spec, self.enabled = spec, enabled
        self.bar, self.tasks, self.first = None, {}, {}

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def update(self, result: dict) -> None:
        restart, n = result["restart"], result["evaluations"]
        now = time.monotonic()
        first_n, first_t = self.first.setdefault(restart, (n - 1, now))
        rate = (n - first_n) / (now - first_t) if now > first_t else 0.0
        if self.bar is None:
            return
        if restart not in self.tasks:
            plan = self.spec["trials"][restart]
            self.tasks[restart] = self.bar.add_task(f"restart {restart} (seed {plan['seed']})",
                                                    total=self.spec["budget"], info="")
        info = f"best {result['best']:.4f}  {rate:.2f} eval/s  {result.get('algorithm', '')}"
        self.bar.update(self.tasks[restart], completed=n, info=info)


@dataclass
class _Listener:
    """What one run's Tune events go to: the live display, the user's callback, interruptions seen."""

    display: "_Display"
    callback: Callable[[dict], None] | None
    run_id: str
    interrupted: list = field(default_factory=list)


_ACTIVE: _Listener | None = None  # the run whose Tuner.fit() is running in this process


class _RunEvents(tune.Callback):
    """The Tune callback of a search. It holds no state (Tune pickles it with the experiment, and a
    resumed run gets the pickled one back) and reports to the run being fitted now."""

    def setup(self, **info):
        # Tune has installed its SIGINT/SIGUSR1 handlers (stop and save the experiment state); note
        # the interruption too, so that unfinished trials are not taken for ASHA-stopped ones
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, getattr(signal, "SIGUSR1", None)):
            previous = signal.getsignal(sig) if sig is not None else None
            if callable(previous):
                def handler(signum, frame, previous=previous):
                    if _ACTIVE is not None:
                        _ACTIVE.interrupted.append(signum)
                    previous(signum, frame)

                signal.signal(sig, handler)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        listener = _ACTIVE
        if listener is None or "startup_error" in result:
            return
        listener.display.update(result)
        if listener.callback is not None:
            listener.callback({"run": listener.run_id, "restart": result["restart"],
                               "evaluations": result["evaluations"], "best": result["best"],
                               "objective": result["objective"]})


def _run_tune(spec, root, actors, custom, run_id, progress, callback, resumed, ready_timeout):
    trainable = tune.with_resources(
        tune.with_parameters(_trial, evaluators=actors, spec={**{k: spec[k] for k in ("trials", "optimizer", "budget", "asks")},
                                                               "ready_timeout": ready_timeout},
                             optimizer=custom["optimizer"]),
        {"cpu": TRIAL_CPUS})
    display = _Display(spec, progress)
    listener = _Listener(display, callback, run_id)

    experiment = root.rstrip("/") + "/" + EXPERIMENT
    filesystem, storage_path = storage.arrow_filesystem(root)  # s3:// through s3fs, as everywhere else
    run_config = tune.RunConfig(
        name=EXPERIMENT, storage_path=storage_path, storage_filesystem=filesystem, verbose=0, callbacks=[_RunEvents()],
        failure_config=tune.FailureConfig(max_failures=spec["max_failures"]),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "0")
    if resumed:
        path = storage_path.rstrip("/") + "/" + EXPERIMENT
        if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
            raise LoraHubError(f"'{experiment}' holds no Tune experiment state to resume")
        # Tune restores the run config pickled with the experiment, callbacks included: the restored
        # _RunEvents holds no state and reports to this run's listener
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=filesystem)
    else:
        scheduler = None
        if spec["scheduler"] == "asha":
            # max_t beyond the budget: ASHA never cuts a trial's final report (its recommendation)
            scheduler = tune.schedulers.ASHAScheduler(
                time_attr="evaluations", max_t=spec["budget"] + 1, grace_period=max(1, spec["budget"] // 4),
                reduction_factor=2)
        tuner = tune.Tuner(
            trainable, param_space={"restart": tune.grid_search(list(range(spec["restarts"])))},
            tune_config=tune.TuneConfig(metric="best", mode="min", scheduler=scheduler,
                                        max_concurrent_trials=spec["restarts"]),
            run_config=run_config)
    global _ACTIVE
    _ACTIVE = listener
    try:
        with display:
            grid = tuner.fit()
    finally:
        _ACTIVE = None
    if listener.interrupted:
        raise SearchInterrupted(f"the search was interrupted; its state is saved in {experiment}: resume it with "
                                f"--resume {spec['output']}", spec["output"])
    return grid, experiment


def _collect(grid, spec: dict, experiment: str, optimizer) -> list[TrialOutcome]:
    for result in grid:
        if result.metrics and result.metrics.get("startup_error"):
            _raise_startup_error({"kind": result.metrics.get("startup_error_kind"),
                                  "message": result.metrics["startup_error"]})
    errors = grid.errors
    if errors:
        first = errors[0]
        raise SearchFailed(f"{len(errors)} of {len(grid)} trials failed; the first with "
                           f"{type(first).__name__}: {_root_message(first)}") from first
    outcomes = []
    for result in grid:
        if result.checkpoint is None:
            raise SearchInterrupted(f"the search was interrupted before every restart had saved its state; "
                                    f"resume it with --resume {spec['output']}", spec["output"])
        with result.checkpoint.as_directory() as directory:
            state = pickle.loads((Path(directory) / STATE_FILE).read_bytes())
        metrics = result.metrics or {}
        restart = metrics.get("restart", result.config["restart"])
        plan = spec["trials"][restart]
        final: SearchResult | None = state["result"]
        history = state["history"]
        if final is not None:
            outcomes.append(TrialOutcome(restart, plan["seed"], plan["modules"], final.weights, final.objective,
                                         final.algorithm, True, history))
        else:
            # _run_tune has raised already if the run was interrupted: under ASHA, a trial without its
            # final report was stopped by the scheduler
            if spec["scheduler"] != "asha":
                raise SearchInterrupted(f"the search was interrupted ({len(history)} of {spec['budget']} evaluations of "
                                        f"restart {restart} done); resume it with --resume {spec['output']}",
                                        spec["output"])
            if len(history) >= spec["budget"]:  # stopped at its last rung after its whole budget
                weights, objective, algorithm = _recommendation(spec, plan, history, optimizer)
                outcomes.append(TrialOutcome(restart, plan["seed"], plan["modules"], weights, objective, algorithm,
                                             True, history))
                continue
            best = min(history, key=lambda e: e.objective)
            outcomes.append(TrialOutcome(restart, plan["seed"], plan["modules"], best.weights, best.objective,
                                         metrics.get("algorithm", ""), False, history))
    return sorted(outcomes, key=lambda o: o.restart)


def _recommendation(spec: dict, plan: dict, history: list[Evaluation], optimizer) -> tuple[list[float], float, str]:
    """The optimizer's recommendation after ``history``, as the trial's own final report would give
    it: the optimizer is rebuilt by replaying the history (nevergrad is deterministic for a seed).
    A recommended point that was never evaluated (e.g. a CMA mean) gives way to the best evaluated."""
    from lorahub_ray.core.search import algorithm_name, make_optimizer, recommended

    opt = make_optimizer(optimizer, len(plan["modules"]), budget=spec["budget"], seed=plan["seed"],
                         num_workers=spec["asks"])
    replay(opt, history, spec["asks"])
    _, seen = recommended(opt, history)
    best = seen if seen is not None else min(history, key=lambda e: e.objective)
    return best.weights, best.objective, algorithm_name(opt)


def _root_message(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else repr(exc)


def _finish(spec, loaded, outcomes: list[TrialOutcome], experiment: str, started: str, seconds: float, custom,
            base_sha256: str):
    from lorahub_ray.core.learning import now, write_output
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.model import load_base_model

    best = min(outcomes, key=lambda o: (o.objective, o.restart))
    chosen = [loaded[i] for i in best.modules]
    base, tokenizer, base_path = load_base_model(spec["model"], device=spec["device"] or "cpu")
    recipe = Recipe(
        base_model=spec["model"], base_model_sha256=base_sha256,
        modules=[{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in chosen],
        weights=best.weights, objective=best.objective, optimizer=spec["optimizer_label"], algorithm=best.algorithm,
        budget=spec["budget"], seed=best.seed, loss=spec["loss_label"], batch_size=spec["batch_size"],
        regularizer=spec["regularizer"] if spec["regularizer"] != "<custom>" else _label(custom["regularizer"]),
        merge_method="linear", template=spec.get("template", "plain"), num_examples=len(spec["inputs"]), started=started, finished=now(),
        search={"backend": "ray-tune", "workers": spec["workers"], "restarts": spec["restarts"],
                "modules_per_restart": spec["modules_per_restart"], "asks_per_trial": spec["asks"],
                "scheduler": spec["scheduler"], "cpus_per_worker": spec["cpus_per_worker"],
                "gpus_per_worker": spec["gpus_per_worker"], "experiment": experiment, "best_restart": best.restart,
                "seconds": seconds,
                "trials": [{"restart": o.restart, "seed": o.seed, "modules": [loaded[i].name for i in o.modules],
                            "objective": o.objective, "algorithm": o.algorithm, "evaluations": len(o.history),
                            "finished": o.finished} for o in outcomes]},
    )
    merged = LoraComposer(base, chosen).merge_and_unload(best.weights)

    def extra(directory: Path) -> None:
        write_history_table(directory / HISTORY_FILE, outcomes, loaded)
        plot_search(directory / PLOT_FILE, outcomes, recipe)

    out = write_output(spec["output"], recipe, merged, tokenizer, extra=extra)
    return RayLoraHubResult(recipe=recipe, trials=outcomes, best=best, model=merged, tokenizer=tokenizer, output=out,
                            experiment=experiment, seconds=seconds)


def write_history_table(path: Path, outcomes: list[TrialOutcome], loaded) -> None:
    """Every evaluation of every restart: trial, seed, step, modules, weights, objective, seconds, wall time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [(o, e) for o in outcomes for e in o.history]
    table = pa.table({
        "trial": pa.array([e.trial for _, e in rows], pa.int32()),
        "seed": pa.array([o.seed for o, _ in rows], pa.int64()),
        "step": pa.array([e.step for _, e in rows], pa.int32()),
        "modules": [[loaded[i].name for i in o.modules] for o, _ in rows],
        "weights": [e.weights for _, e in rows],
        "objective": pa.array([e.objective for _, e in rows], pa.float64()),
        "seconds": pa.array([e.seconds for _, e in rows], pa.float64()),
        "wall": pa.array([getattr(e, "wall", float("nan")) for _, e in rows], pa.float64()),
        "algorithm": [o.algorithm for o, _ in rows],
    })
    pq.write_table(table, path)


def plot_search(path: Path, outcomes: list[TrialOutcome], recipe: Recipe) -> None:
    """Best objective against evaluations for each restart, and the winning weights per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m["name"] for m in recipe.modules]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, max(1, len(names) / 10)]})
    for o in outcomes:
        values = [e.objective for e in sorted(o.history, key=lambda e: e.step)]
        if values:
            left.plot(range(1, len(values) + 1), np.minimum.accumulate(values),
                      label=f"restart {o.restart} (seed {o.seed})" + ("" if o.finished else ", stopped"))
    left.set_xlabel("evaluations")
    left.set_ylabel("best objective")
    left.set_title("search progress")
    left.legend(fontsize="small")
    right.bar(range(len(names)), recipe.weights, color=["tab:blue" if w >= 0 else "tab:red" for w in recipe.weights])
    right.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize="small")
    right.axhline(0, color="black", linewidth=0.5)
    right.set_title(f"winning weights (restart {recipe.search.get('best_restart', 0)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
