"""Evaluation of test sets of any size, one task per file, with a fixed batching plan.

This module is pure (no Ray). It holds everything both evaluation paths share, so that the
in-process path (:func:`evaluate_local`) and the sharded Ray Data path
(:mod:`lorahub_ray.cluster.data_eval`) compute *exactly* the same predictions:

Batching plan
    Greedy generation of a padded batch can depend on what else is in the batch (padding
    lengths, kernel blocking). So the batches are not cut by position in the file, which
    would depend on how a reader splits the data, but by content: every row goes to the group
    ``(task, crc32(input) mod G)`` with ``G = ceil(rows of the task / (batch_size ·
    BATCHES_PER_GROUP))``; inside a group the rows are sorted by ``(len(input), input,
    target)`` (which also keeps padding small) and cut into batches of ``batch_size``. Any
    worker that receives a whole group builds the same batches, whatever the sharding.

Outputs
    ``predictions.parquet`` (task, input, target, prediction, correct, input_tokens), sorted
    by task, then input and target; ``metrics.json`` with accuracy (percent), examples,
    examples per second, input tokens per example, per task and as a macro average over tasks.

Data
    ``data`` is one file (JSON Lines, Parquet or CSV) or a folder or prefix of many, one per
    task (the BBH layout), local or ``s3://``, or a task source (``bbh:TASK``, ``reasoning-gym:NAME``,
    ``bigbench:TASK``: its test split, written once as a JSON Lines file, :mod:`lorahub_ray.io.sources`).
    Every file is checked before any model loads.
"""

from __future__ import annotations

import json
import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import fsspec

from lorahub_ray.io import sources, storage
from lorahub_ray.io.examples import FORMATS, Examples, as_examples, data_format, read_examples
from lorahub_ray.errors import DataError, LoraHubError
from lorahub_ray.core.templates import check_template, prompt_ids
from lorahub_ray.core.recipe import RECIPE_FILE, Recipe
from lorahub_ray.evaluation.generate import exact_match, generate
from lorahub_ray.progress import progress_bar

BATCHES_PER_GROUP = 4
PREDICTIONS_FILE = "predictions.parquet"
METRICS_FILE = "metrics.json"
COLUMNS = ("task", "input", "target", "prediction", "correct", "input_tokens")


# --- data files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataFile:
    uri: str
    task: str
    rows: int = 0


def task_name(uri: str) -> str:
    name = str(uri).rstrip("/").rsplit("/", 1)[-1]
    for suffix in FORMATS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def list_data_files(uri: str) -> list[str]:
    """``uri`` itself if it is a file, else the data files (known suffixes) in the folder or
    under the prefix ``uri``, sorted. Local paths or fsspec URLs (``s3://bucket/prefix``). A task
    source is its ``test`` split (unless it names another), written once as a JSON Lines file."""
    uri = str(uri)
    if sources.is_source(uri):
        return [str(sources.materialize(uri, default_split="test"))]
    if storage.is_remote(uri):
        fs, root = fsspec.core.url_to_fs(uri)
        protocol = uri.split("://", 1)[0]
        try:
            if fs.isfile(root):
                return [uri]
            if fs.isdir(root):
                found = [p for p in fs.ls(root.rstrip("/"), detail=False)]
            else:
                found = fs.glob(root + "*")
        except Exception as exc:
            raise DataError(f"{uri}: could not be listed ({type(exc).__name__}: {exc})") from None
        files = sorted(f"{protocol}://{p}" for p in found if _is_data_file(p) and fs.isfile(p))
    else:
        path = Path(uri.removeprefix("file://")).expanduser()
        if path.is_file():
            return [uri]
        if path.is_dir():
            candidates = list(path.iterdir())
        else:
            candidates = list(path.parent.glob(path.name + "*")) if path.parent.is_dir() else []
        files = sorted(str(p) for p in candidates if p.is_file() and _is_data_file(p.name))
    if not files:
        raise DataError(f"{uri}: no such file, and no data files ({', '.join(sorted(FORMATS))}) in it or under it")
    return files


def _is_data_file(name: str) -> bool:
    return any(str(name).lower().endswith(s) for s in FORMATS)


def check_file(uri: str, *, input_field: str = "input", output_field: str = "output") -> DataFile:
    """Read and check every row of one file (the errors name the file and row); return its size."""
    examples = read_examples(uri, input_field=input_field, output_field=output_field)
    return DataFile(uri, task_name(uri), len(examples))


def check_tasks(files: Sequence[str]) -> None:
    seen: dict[str, str] = {}
    for f in files:
        data_format(f)
        name = task_name(f)
        if name in seen:
            raise DataError(f"two data files for task '{name}': {seen[name]} and {f}")
        seen[name] = f


# --- the batching plan ---------------------------------------------------------------------------


def num_groups(rows: int, batch_size: int) -> int:
    return max(1, math.ceil(rows / (batch_size * BATCHES_PER_GROUP)))


def group_of(task: str, text: str, groups: int) -> str:
    """The group a row belongs to: depends only on its task, its input and the task's size."""
    return f"{task}\x00{zlib.crc32(text.encode('utf-8')) % groups:08d}"


def group_batches(inputs: Sequence[str], targets: Sequence[str], batch_size: int) -> list[list[int]]:
    """Indices of one group's rows, in the fixed order, cut into batches of ``batch_size``."""
    order = sorted(range(len(inputs)), key=lambda i: (len(inputs[i]), inputs[i], targets[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def generate_group(model, tokenizer, task: str | Sequence[str], inputs: Sequence[str], targets: Sequence[str], *,
                   batch_size: int, max_new_tokens: int, prompts: Sequence[str] | None = None,
                   max_length: int = 2048, progress=None, template: str = "plain") -> dict[str, list]:
    """Predictions for one whole group, batched by :func:`group_batches` over the prompts (the
    inputs themselves unless ``prompts`` is given), each rendered with ``template``; returns result
    columns in the fixed order. ``input_tokens`` counts the tokens the model is given."""
    tasks = [task] * len(inputs) if isinstance(task, str) else list(task)
    prompts = list(inputs) if prompts is None else list(prompts)
    out: dict[str, list] = {c: [] for c in COLUMNS}
    for batch in group_batches(prompts, targets, batch_size):
        chunk = [prompts[i] for i in batch]
        predictions = generate(model, tokenizer, chunk, batch_size=len(chunk), max_new_tokens=max_new_tokens,
                               max_length=max_length, template=template)
        lengths = [len(ids) for ids in prompt_ids(tokenizer, chunk, template, max_length=max_length)]
        for i, prediction, n in zip(batch, predictions, lengths):
            out["task"].append(tasks[i])
            out["input"].append(inputs[i])
            out["target"].append(targets[i])
            out["prediction"].append(prediction)
            out["correct"].append(exact_match(prediction, targets[i]))
            out["input_tokens"].append(n)
        if progress is not None:
            progress(len(chunk))
    return out


def model_template(model, template: str | None = None) -> str:
    """The template to evaluate ``model`` with: ``template`` if given, else the one its recipe
    records (a lorahub-ray output directory, local or ``s3://``), else ``plain``."""
    if template is not None:
        return check_template(template)
    if isinstance(model, (str, Path)):
        uri = str(model)
        local = Path(uri).expanduser()
        remote = storage.is_remote(uri) and not uri.lower().endswith(".gguf")
        if remote or (local.is_dir() and (local / RECIPE_FILE).is_file()):
            try:
                return check_template(Recipe.load(uri).template)
            except LoraHubError:
                if not remote:
                    raise
    return "plain"


# --- results -------------------------------------------------------------------------------------


@dataclass
class EvaluationResult:
    predictions: dict[str, list]  # the COLUMNS, sorted by task, input, target
    metrics: dict = field(default_factory=dict)

    @property
    def accuracy(self) -> float:
        return self.metrics["accuracy"]


def sort_results(columns: dict[str, list]) -> dict[str, list]:
    n = len(columns["input"])
    order = sorted(range(n), key=lambda i: (columns["task"][i], columns["input"][i], columns["target"][i],
                                            columns["prediction"][i]))
    return {c: [columns[c][i] for i in order] for c in COLUMNS}


def summarize(columns: dict[str, list], seconds: float, **extra) -> dict:
    """Metrics overall, per task and as a macro average over tasks (accuracy in percent)."""

    def block(idx: list[int], secs: float | None) -> dict:
        n = len(idx)
        correct = sum(bool(columns["correct"][i]) for i in idx)
        tokens = sum(int(columns["input_tokens"][i]) for i in idx)
        d = {"accuracy": 100.0 * correct / n if n else 0.0, "examples": n,
             "input_tokens_per_example": tokens / n if n else 0.0}
        if secs is not None:
            d["seconds"] = secs
            d["examples_per_second"] = n / secs if secs > 0 else None
        return d

    n = len(columns["input"])
    metrics = block(list(range(n)), seconds)
    by_task: dict[str, list[int]] = {}
    for i, t in enumerate(columns["task"]):
        by_task.setdefault(t, []).append(i)
    metrics["tasks"] = {t: block(idx, None) for t, idx in sorted(by_task.items())}
    metrics["macro_accuracy"] = sum(v["accuracy"] for v in metrics["tasks"].values()) / max(1, len(by_task))
    metrics.update(extra)
    return metrics


def write_results(output: str | Path, result: EvaluationResult) -> Path:
    """``predictions.parquet`` and ``metrics.json``, written atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.output_directory(output, marker=METRICS_FILE) as tmp:
        table = pa.table({
            "task": pa.array(result.predictions["task"], pa.string()),
            "input": pa.array(result.predictions["input"], pa.string()),
            "target": pa.array(result.predictions["target"], pa.string()),
            "prediction": pa.array(result.predictions["prediction"], pa.string()),
            "correct": pa.array(result.predictions["correct"], pa.bool_()),
            "input_tokens": pa.array(result.predictions["input_tokens"], pa.int64()),
        })
        pq.write_table(table, tmp / PREDICTIONS_FILE)
        (tmp / METRICS_FILE).write_text(json.dumps(result.metrics, indent=2) + "\n")
    return Path(output)


# --- the in-process path -------------------------------------------------------------------------

Transform = Callable[[str], str]


def read_tasks(data: str, *, input_field: str = "input", output_field: str = "output") -> list[tuple[DataFile, Examples]]:
    """Every data file under ``data``, read and checked (errors name the file and row)."""
    files = list_data_files(data)
    check_tasks(files)
    out = []
    for f in files:
        examples = read_examples(f, input_field=input_field, output_field=output_field)
        out.append((DataFile(f, task_name(f), len(examples)), examples))
    return out


def evaluate_examples(model, tokenizer, tasks: Sequence[tuple[DataFile, Examples]], *, batch_size: int = 32,
                      max_new_tokens: int = 64, transform: Transform | None = None, progress=None,
                      template: str = "plain") -> dict[str, list]:
    """Generate for every group in-process, in the fixed plan; returns the result columns (unsorted).

    ``transform`` rewrites each input before generation (e.g. the in-context prompt); the
    grouping uses the original input, so the plan is the same for every transform."""
    results: dict[str, list] = {c: [] for c in COLUMNS}
    for datafile, examples in tasks:
        groups = num_groups(len(examples), batch_size)
        members: dict[str, list[int]] = {}
        for i, text in enumerate(examples.inputs):
            members.setdefault(group_of(datafile.task, text, groups), []).append(i)
        for key in sorted(members):
            idx = members[key]
            inputs = [examples.inputs[i] for i in idx]
            targets = [examples.outputs[i] for i in idx]
            prompts = [transform(x) for x in inputs] if transform else None
            out = generate_group(model, tokenizer, datafile.task, inputs, targets, prompts=prompts,
                                 batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                                 template=template)
            for c in COLUMNS:
                results[c].extend(out[c])
    return results


def evaluate_local(model, data, *, tokenizer=None, batch_size: int = 32, max_new_tokens: int = 64,
                   input_field: str = "input", output_field: str = "output", transform: Transform | None = None,
                   device: str | None = None, template: str | None = None, progress: bool = True) -> EvaluationResult:
    """Evaluate ``model`` (a lorahub-ray output directory, any model path/URI, or a loaded model with
    ``tokenizer``) on ``data`` (a file, or a folder/prefix of one file per task, or in-memory
    examples: an :class:`~lorahub_ray.io.examples.Examples` or ``(inputs, outputs)``, one task named
    ``examples``), in this process. :func:`lorahub_ray.api.evaluate_data` also shards it on Ray Data,
    with exactly the same predictions and metrics. ``template`` renders each input (see
    :func:`model_template`: by default the one the model's recipe records).
    """
    template = model_template(model, template)
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    in_memory = not isinstance(data, (str, Path))
    if in_memory:
        examples = as_examples(data)
        if not examples.inputs:
            raise DataError("no examples given")
        tasks = [(DataFile(examples.source, "examples", len(examples)), examples)]
    else:  # every file read and checked before the model loads
        tasks = read_tasks(str(data), input_field=input_field, output_field=output_field)
    if tokenizer is None:
        # imported here: torch and transformers are heavy, and Ray Data's file-check tasks import this module
        from lorahub_ray.core.model import load_model

        model, tokenizer = load_model(model, device=device)
    total = sum(len(ex) for _, ex in tasks)
    start = time.perf_counter()
    with progress_bar("generating", total, enabled=progress) as advance:
        columns = evaluate_examples(model, tokenizer, tasks, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens, transform=transform, progress=advance,
                                    template=template)
    seconds = time.perf_counter() - start
    result = EvaluationResult(sort_results(columns))
    result.metrics = summarize(result.predictions, seconds, data=tasks[0][1].source if in_memory else str(data),
                               workers=0, batch_size=batch_size, template=template)
    return result
