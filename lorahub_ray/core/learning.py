"""LoraHub learning in one process: load, search, compose, and write the output (recipe, adapter, history;
the merged model when asked).

The search on Ray (:mod:`lorahub_ray.cluster.ray_search`) shares what lies around the search
itself: the settings and their checks (:class:`~lorahub_ray.core.settings.SearchSettings`),
:func:`load_module_list`, :func:`make_recipe` and :func:`write_output`, whose history table
(:func:`write_history`) has one schema for both backends: the local search is restart 0 of a
portfolio of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from lorahub_ray.io import storage
from lorahub_ray.core.adapter import save_adapter
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.io.examples import as_examples
from lorahub_ray.errors import LoraHubError
from lorahub_ray.core.families import check_template
from lorahub_ray.core.model import base_family, base_model_sha256, load_base_model
from lorahub_ray.core.modules import LoraModule, check_compatible, load_modules
from lorahub_ray.core.objective import FewShotObjective, LossFn, l1_regularization
from lorahub_ray.core.portfolio import RestartOutcome, RestartPlan
from lorahub_ray.core.preselect import check_k, hub_size, screen_and_choose
from lorahub_ray.core.recipe import ADAPTER_DIR, HISTORY_FILE, MODEL_DIR, RECIPE_FILE, Recipe
from lorahub_ray.core.search import DEFAULT_BUDGET, DEFAULT_OPTIMIZER, SearchResult, minimize
from lorahub_ray.core.selection import (SCORES, SELECT_METHODS, MapFolds, SelectionConfig, SelectionContext,
                                       progress_plan, select as cv_select, sequential)
from lorahub_ray.core.settings import SearchSettings
from lorahub_ray.progress import progress_bar


@dataclass
class LoraHubResult:
    recipe: Recipe
    search: SearchResult
    model: torch.nn.Module  # the base model with the composed LoRA merged in
    tokenizer: object
    output: Path | str | None = None  # a str for remote (s3://) outputs
    modules: list[LoraModule] = dataclasses.field(default_factory=list)  # the recipe's, in its order

    @property
    def weights(self) -> dict[str, float]:
        return self.recipe.module_weights


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def load_module_list(modules: Sequence[str | LoraModule], progress: bool) -> list[LoraModule]:
    if all(isinstance(m, LoraModule) for m in modules):
        check_compatible(list(modules))
        return list(modules)
    uris = [str(m) for m in modules]
    with progress_bar("loading modules", None, enabled=progress) as advance:
        return load_modules(uris, progress=lambda m: advance(info=m.name))


def make_recipe(*, model: str, base_sha256: str, modules: Sequence[LoraModule], weights: Sequence[float],
                objective: float, optimizer: str, algorithm: str, seed: int, settings: SearchSettings,
                merge_method: str, num_examples: int, started: str, search: dict, template: str = "plain") -> Recipe:
    """The recipe of a finished search, local or on Ray (``search`` says how it ran; ``optimizer`` and
    ``seed`` are the winning restart's)."""
    return Recipe(
        base_model=str(model), base_model_sha256=base_sha256,
        modules=[{"name": m.name, "uri": m.uri, "sha256": m.sha256} for m in modules],
        weights=[float(w) for w in weights], objective=float(objective), optimizer=optimizer,
        algorithm=algorithm, budget=settings.budget, seed=seed, loss=settings.loss_label,
        batch_size=settings.batch_size, regularizer=settings.regularizer_label, merge_method=merge_method,
        template=template, num_examples=num_examples, started=started, finished=now(), search=search)


def write_output(output: str | Path, recipe: Recipe, modules: Sequence[LoraModule], *,
                 merged: tuple[object, object] | None = None,
                 history: tuple[Sequence[RestartOutcome], Sequence[LoraModule]] | None = None,
                 extra: Callable[[Path], None] | None = None) -> Path | str:
    """Write a run's output atomically (a local directory, or ``s3://...`` with ``recipe.json`` uploaded
    last) and return where it is:

    * ``adapter/``: the composition as a PEFT LoRA adapter, computed from ``modules`` (the recipe's
      modules, in the order of ``recipe.modules``) and ``recipe.weights``, no model needed (see
      :mod:`lorahub_ray.core.adapter`); the recipe records its sha256;
    * ``model/``: only with ``merged=(model, tokenizer)`` (``--merge``), the merged model, ``save_pretrained``;
    * ``history.parquet``: with ``history=(outcomes, hub modules)``, see :func:`write_history`;
    * whatever ``extra(directory)`` adds;
    * ``recipe.json``, last: a directory with ``recipe.json`` is complete.
    """
    with storage.output_directory(output, marker=RECIPE_FILE) as tmp:
        if history is not None:
            write_history(tmp / HISTORY_FILE, *history)
        if extra is not None:
            extra(tmp)
        write_run(tmp, recipe, modules, merged=merged)
    return str(output) if storage.is_remote(str(output)) else Path(output)


def write_run(directory: Path, recipe: Recipe, modules: Sequence[LoraModule], *,
              merged: tuple[object, object] | None = None) -> None:
    """A run's own files, into the local ``directory``: ``adapter/``, ``model/`` (with ``merged``) and
    ``recipe.json``, last (see :func:`write_output`). What any reader of a run directory needs
    (:func:`lorahub_ray.core.model.load_model`, ``evaluate``, ``serve``)."""
    recipe.adapter_sha256 = save_adapter(directory / ADAPTER_DIR, recipe, modules)
    if merged is not None:
        model, tokenizer = merged
        model.save_pretrained(directory / MODEL_DIR)
        tokenizer.save_pretrained(directory / MODEL_DIR)
    recipe.save(directory)  # last: a directory with recipe.json is complete


def write_history(path: Path, outcomes: Sequence[RestartOutcome], modules: Sequence[LoraModule]) -> None:
    """Every evaluation of every restart, one row each: restart, seed, optimizer, algorithm, step, modules
    (names, in the restart's order), weights (in that order), objective, seconds (of the evaluation)
    and wall (seconds since the restart's search started)."""
    import pyarrow as pa  # only for writing the table
    import pyarrow.parquet as pq

    rows = [(o, e) for o in outcomes for e in o.history]
    table = pa.table({
        "restart": pa.array([o.restart for o, _ in rows], pa.int32()),
        "seed": pa.array([o.plan.seed for o, _ in rows], pa.int64()),
        "optimizer": pa.array([o.plan.optimizer for o, _ in rows], pa.string()),
        "algorithm": pa.array([o.algorithm for o, _ in rows], pa.string()),
        "step": pa.array([e.step for _, e in rows], pa.int32()),
        "modules": pa.array([[modules[i].name for i in o.plan.modules] for o, _ in rows], pa.list_(pa.string())),
        "weights": pa.array([e.weights for _, e in rows], pa.list_(pa.float64())),
        "objective": pa.array([e.objective for _, e in rows], pa.float64()),
        "seconds": pa.array([e.seconds for _, e in rows], pa.float64()),
        "wall": pa.array([e.wall for _, e in rows], pa.float64()),
    })
    pq.write_table(table, path)


def lorahub_learning(
    model: str,
    modules: Sequence[str | LoraModule],
    examples,
    *,
    output: str | Path | None = None,
    budget: int = DEFAULT_BUDGET,
    optimizer: str = DEFAULT_OPTIMIZER,
    seed: int = 42,
    loss: str | LossFn = "reference",
    batch_size: int | None = None,
    regularizer: Callable[[Sequence[float]], float] = l1_regularization,
    input_field: str = "input",
    output_field: str = "output",
    device: str | None = None,
    asks: int = 1,
    template: str = "plain",
    preselect: int | None = None,
    progress: bool = True,
    select: str = "reference",
    score: str = "loss",
    selection: SelectionConfig | None = None,
    map_folds: MapFolds | None = None,
    merge: bool = False,
) -> LoraHubResult:
    """LoraHub learning: find weights for ``modules`` on the few-shot ``examples``, merge them into
    ``model`` and (with ``output``) save ``recipe.json``, ``adapter/`` (the composed module as a PEFT
    LoRA adapter) and ``history.parquet``; with ``merge`` also ``model/``, the merged model (see
    :func:`write_output`).

    ``model`` and each of ``modules`` is a Hub id, a local directory or an ``s3://`` URI; a
    module entry may also be a folder of adapter directories. ``loss`` is ``"reference"`` (the
    reference's batch-size-dependent loss, see :mod:`lorahub_ray.core.objective`), ``"mean"`` or a
    callable; ``batch_size=None`` puts all examples in one batch, as the reference does. ``asks``
    candidates are asked at once (nevergrad's ``num_workers``: NGOpt may pick another algorithm) and
    evaluated together, sharing forward passes, which buys wall time on small few-shot sets.
    With ``preselect=k`` every module is first scored alone on the examples and the search runs over
    the k best, starting at weight 1 on the best of them (see :mod:`lorahub_ray.core.preselect`); the
    recipe then lists those k and records every module's score in ``search["preselect"]``.

    ``select="reference"`` keeps the search's best objective, as the reference does. ``select="cv"``
    chooses among the base model, each single module and several searches (from 0 and warm-started
    at the best single modules) by cross-validation over the examples, scored by the held-out loss
    or, with ``score="generate"``, by exact match of greedy generations, and refits the winner on
    all examples (see :mod:`lorahub_ray.core.selection`; ``selection`` sets its other options).
    The recipe's ``search["selection"]`` records every candidate's fold scores and why the winner won.
    ``map_folds`` runs the folds (default: one after the other here); with
    ``lorahub_ray.cluster.folds.RayFolds(workers=W)`` they run at once on W Ray actors, with the same result.

    ``template`` ("plain" or "chat", see :mod:`lorahub_ray.core.families`) turns the inputs into
    prompts; the recipe records it, and evaluation and serving apply it from there.
    """
    started = now()
    # cheap checks first: bad input fails before any model is loaded
    data = as_examples(examples, input_field=input_field, output_field=output_field)
    settings = SearchSettings(budget=budget, optimizer=optimizer, seed=seed, loss=loss, batch_size=batch_size,
                              regularizer=regularizer, asks=asks).check()
    check_template(template)
    check_k(preselect)
    if select not in SELECT_METHODS:
        raise LoraHubError(f"unknown select {select!r}; choose from {', '.join(SELECT_METHODS)}")
    if score not in SCORES:
        raise LoraHubError(f"unknown score {score!r}; choose from {', '.join(SCORES)}")
    if select == "reference" and (score != "loss" or selection is not None or map_folds is not None):
        raise LoraHubError("score, selection and map_folds apply to select='cv' only")
    config = dataclasses.replace(selection or SelectionConfig(), score=score)
    config.check()
    if select == "cv" and len(data) < 2:
        raise LoraHubError(f"select='cv' needs at least 2 few-shot examples, got {len(data)}")
    if output is not None:
        storage.check_output(output, marker=RECIPE_FILE)
    if preselect is not None:
        check_k(preselect, hub_size(modules))
    loaded = load_module_list(modules, progress)
    _, family = base_family(model)  # from the config alone: an adapter of the other family fails before the weights load
    for module in loaded:
        family.check_module(module)
    with progress_bar("loading the base model", None, enabled=progress):
        base, tokenizer, base_path = load_base_model(model, device=device)
    check_template(template, tokenizer)
    composer = LoraComposer(base, loaded)
    objective = FewShotObjective(composer, tokenizer, data.inputs, data.outputs, loss=loss, batch_size=batch_size,
                                 regularizer=regularizer, template=template)
    screening = None
    if preselect is not None:
        with progress_bar("screening modules", len(loaded), enabled=progress) as advance:
            screening = screen_and_choose(objective, [m.name for m in loaded], preselect, progress=advance)
        composer_scope = composer.restrict(screening.chosen)  # the search sees the k chosen alone
    else:
        composer_scope = contextlib.nullcontext()
    search_info: dict = {"backend": "local", "asks": asks}
    if screening is not None:
        search_info["preselect"] = screening.to_recipe()
    regularizer_name = settings.regularizer_label
    with composer_scope:
        searched = composer.modules
        # the one search, restart 0 of a portfolio; after a screen it starts at weight 1 on the best screened
        start = screening.chosen.index(screening.ranking()[0]) if screening is not None and select != "cv" else None
        plan = RestartPlan(restart=0, seed=seed, modules=list(range(len(searched))), optimizer=settings.optimizer_label,
                           start=start)
        if select == "cv":
            context = SelectionContext(composer, tokenizer, data.inputs, data.outputs,
                                       names=[m.name for m in searched], loss=loss, batch_size=batch_size,
                                       regularizer=regularizer, budget=budget, optimizer=optimizer, seed=seed,
                                       asks=asks, config=config, template=template, model=str(model), device=device)
            with progress_bar(*progress_plan(context), enabled=progress) as advance:
                chosen = cv_select(context, map_folds=map_folds or sequential, advance=advance)
            result, search_info["selection"] = chosen.search, chosen.report
            if hasattr(map_folds, "describe"):  # where a backend ran the folds
                search_info["selection"]["folds_backend"] = map_folds.describe()
            regularizer_name = chosen.regularizer or regularizer_name
        else:
            with progress_bar(f"search ({settings.optimizer_label})", budget, enabled=progress) as advance:
                result = minimize(objective, len(searched), budget=budget, optimizer=optimizer, seed=seed,
                                  num_workers=asks, evaluate_batch=objective.evaluate_many if asks > 1 else None,
                                  callback=lambda e, best: advance(info=f"best {best:.4f}"), init=plan.init())
        merged = composer.merge_and_unload(result.weights)
    recipe = make_recipe(model=str(model), base_sha256=base_model_sha256(base_path), modules=searched,
                         weights=result.weights, objective=result.objective, optimizer=result.optimizer,
                         algorithm=result.algorithm, seed=seed, settings=settings, merge_method=composer.merge_method,
                         num_examples=len(data), started=started, search=search_info, template=template)
    recipe.regularizer = regularizer_name  # a cross-validated L1 strength, when select='cv' chose one
    saved = None
    if output is not None:
        outcome = RestartOutcome(plan, result.weights, result.objective, result.algorithm, True, result.history)
        with progress_bar("writing the output", None, enabled=progress):
            saved = write_output(output, recipe, searched, merged=(merged, tokenizer) if merge else None,
                                 history=([outcome], searched))
    return LoraHubResult(recipe=recipe, search=result, model=merged, tokenizer=tokenizer, output=saved,
                         modules=list(searched))
