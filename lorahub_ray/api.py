"""The Python API, as ``from lorahub_ray import ...`` gives it. The CLI is a thin layer over it.

>>> from lorahub_ray import lorahub_learning, evaluate
>>> result = lorahub_learning("google/flan-t5-large", ["lorahub/flan_t5_large-coqa", ...],
...                           "fewshot.jsonl", output="runs/mytask")
>>> evaluate("runs/mytask", "test.jsonl")["accuracy"]

This module sits above the Ray-free layers and the Ray layer: :func:`evaluate_data` is where an
evaluation goes in-process (:mod:`lorahub_ray.evaluation.evaluate`) or to Ray Data
(:mod:`lorahub_ray.cluster.data_eval`, imported only then, so that ``import lorahub_ray`` never
imports Ray).
"""

from __future__ import annotations

from pathlib import Path

from lorahub_ray.core.learning import LoraHubResult, lorahub_learning  # noqa: F401  (the API)
from lorahub_ray.core.model import build_model, load_model  # noqa: F401  (the API)
from lorahub_ray.core.protocol import run_protocol
from lorahub_ray.errors import DataError
from lorahub_ray.evaluation import bbh as bbh_tables
from lorahub_ray.evaluation import compare as comparison
from lorahub_ray.evaluation.evaluate import (EvaluationResult, Transform, evaluate_local, list_data_files, task_name,
                                             write_results)


def evaluate_data(model, data, *, output: str | Path | None = None, workers: int = 0,
                  gpus_per_worker: float = 0.0, cpus_per_worker: float | None = None, address: str | None = None,
                  tokenizer=None, batch_size: int = 32, max_new_tokens: int = 64, input_field: str = "input",
                  output_field: str = "output", transform: Transform | None = None, device: str | None = None,
                  template: str | None = None, progress: bool = True) -> EvaluationResult:
    """Evaluate ``model`` on ``data`` in this process (``workers=0``, see
    :func:`lorahub_ray.evaluation.evaluate.evaluate_local`) or sharded across ``workers`` Ray Data
    actors on the cluster that ``address`` names (see :mod:`lorahub_ray.cluster.connect`), with exactly
    the same predictions and metrics; with ``output``, writes ``metrics.json`` and ``predictions.parquet``."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    options = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, input_field=input_field,
                   output_field=output_field, transform=transform, device=device, template=template)
    if workers and workers > 0:
        if not isinstance(data, (str, Path)):
            raise DataError("sharded evaluation reads files: pass a path or URI as data, not examples in memory")
        if tokenizer is not None:
            raise DataError("sharded evaluation loads the model on each worker: pass a path or URI, not a loaded model")
        from lorahub_ray.cluster.data_eval import evaluate_sharded  # Ray is imported only when it is asked for

        result = evaluate_sharded(str(model), data, workers=workers, gpus_per_worker=gpus_per_worker,
                                  cpus_per_worker=cpus_per_worker, address=address, **options)
    else:
        result = evaluate_local(model, data, tokenizer=tokenizer, progress=progress, **options)
    if output is not None:
        write_results(output, result)
    return result


def evaluate(model, data, *, output: str | Path | None = None, tokenizer=None, batch_size: int = 32,
             max_new_tokens: int = 64, input_field: str = "input", output_field: str = "output",
             device: str | None = None, workers: int = 0, gpus_per_worker: float = 0.0, address: str | None = None,
             template: str | None = None, progress: bool = True) -> dict:
    """Exact-match accuracy of ``model`` on ``data``: what ``lorahub-ray evaluate`` does.

    ``model`` is a lorahub-ray output directory, any model path/URI, or a loaded model with
    ``tokenizer``; ``data`` a file, a folder or prefix of one file per task, or in-memory examples
    (``Examples`` or ``(inputs, outputs)``). Returns the metrics (``accuracy`` in percent, per task and
    macro-averaged; see :func:`evaluate_data`); with ``output``, writes ``metrics.json`` and
    ``predictions.parquet`` there. ``workers=W`` shards the generation over W Ray Data actors, with
    the same predictions.
    """
    return evaluate_data(model, data, output=output, workers=workers, gpus_per_worker=gpus_per_worker,
                         address=address, tokenizer=tokenizer, batch_size=batch_size, max_new_tokens=max_new_tokens,
                         input_field=input_field, output_field=output_field, device=device,
                         template=template, progress=progress).metrics


def compare(model: str, recipe: str | Path, examples, data: str, *, workers: int = 0, gpus_per_worker: float = 0.0,
            cpus_per_worker: float | None = None, address: str | None = None, **options) -> dict:
    """Zero-shot, in-context learning and LoraHub on one test set (see
    :func:`lorahub_ray.evaluation.compare.compare`), each evaluated by :func:`evaluate_data`."""

    def run(model, data, **kwargs) -> EvaluationResult:
        return evaluate_data(model, data, workers=workers, gpus_per_worker=gpus_per_worker,
                             cpus_per_worker=cpus_per_worker, address=address, **kwargs)

    return comparison.compare(model, recipe, examples, data, evaluate=run, workers=workers, **options)


def lorahub_tasks(model: str, modules, tasks: str, *, output: str, workers: int | None = None,
                  address: str | None = None, **options) -> dict:
    """The paper's protocol in one call: LoraHub learning on every few-shot file of ``tasks`` (a
    folder or ``s3://`` prefix of one file per task, the BBH layout, or one file), with the base
    model and the hub loaded once. Writes ``output/<task>/`` (recipe, adapter, history; the
    task named by its file's stem; ``merge=True`` adds the merged ``model/``) and ``output/summary.json``,
    and returns the summary. ``options``
    as :func:`lorahub_ray.core.protocol.run_protocol` takes them (``restarts``,
    ``modules_per_restart``, ``preselect``, ``budget``, ...). With ``workers`` (≥ 1) or ``address`` the
    tasks run on Ray (:func:`lorahub_ray.cluster.ray_tasks.lorahub_tasks_ray`: one set of evaluator
    actors for all tasks, each task a portfolio of restarts; ``portfolio``, ``asks``,
    ``cpus_per_worker``, ``gpus_per_worker`` and ``template`` go there too)."""
    if workers or address is not None:
        from lorahub_ray.cluster.ray_tasks import lorahub_tasks_ray  # Ray is imported only when it is asked for

        return lorahub_tasks_ray(model, modules, tasks, output=output, workers=workers or 2, address=address,
                                 **options)
    files = [(task_name(f), f) for f in list_data_files(tasks)]
    if not files:
        raise DataError(f"no task files (.jsonl, .json, .parquet, .csv) at or under '{tasks}'")
    return run_protocol(model, modules, files, output=output, **options)


def bbh_table(model: str, hub: str, output: str | Path, *, workers: int = 0, gpus_per_worker: float = 0.0,
              address: str | None = None, **options) -> dict:
    """The BBH table (see :func:`lorahub_ray.evaluation.bbh.bbh_table`); with ``workers``, every
    evaluation is sharded on Ray Data by :func:`evaluate_data` and select_cv's folds run on ``workers``
    Ray actors (:class:`lorahub_ray.cluster.folds.RayFolds`); the LoraHub searches run in this process."""
    if workers and workers > 0:
        from lorahub_ray.cluster.folds import RayFolds

        def run(model, data, **kwargs) -> EvaluationResult:
            return evaluate_data(model, data, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
                                 **kwargs)

        options["evaluate"] = run
        options["map_folds"] = RayFolds(workers, address=address, gpus_per_worker=gpus_per_worker)
    return bbh_tables.bbh_table(model, hub, output, workers=workers, **options)
