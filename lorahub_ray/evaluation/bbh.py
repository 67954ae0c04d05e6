"""The paper's BBH table in one call: zero-shot, ICL, LoraHub (mean and best over seeds) and the best
single module, for each task, rebuilt from BIG-bench's sources (see :mod:`lorahub_ray.io.bigbench`).

For every task: the few-shot examples (``shots``, 5) and the test set (up to 250) are the seeded,
disjoint splits of its BIG-bench source, with ``split_seed``. Then, one *cell* per method:

``zero_shot``     the base model on each test input;
``icl``           the base model with the few-shot examples prepended (:func:`.compare.icl_prompt`);
``lorahub_mean``  LoraHub learning (budget 40, NGOpt) run with seeds 0..``seeds``-1, each over a random
                  subset of ``modules_per_run`` (20) modules of the hub drawn with its seed (the same
                  subsets for every task), as the paper's protocol: the mean over the runs;
``lorahub_best``  the best of those runs on the test set (the paper's "best", an oracle over seeds);
``best_single``   the one module (weight 1) with the lowest few-shot loss (the reference's loss).

A cell holds accuracy (exact match, percent, normalised as the reference), input tokens per
example and seconds (wall time of the cell: the evaluation, plus the search for LoraHub; per run
for ``lorahub_mean``). ``output`` receives ``bbh.json`` (the settings), ``table.json``
(``{"tasks": {TASK: {METHOD: cell}}, "macro": {METHOD: cell}}``, the macro average over the tasks),
``table.png`` and ``<TASK>/<METHOD>/predictions.parquet`` (input, target, prediction, correct,
input_tokens; with a ``seed`` column for ``lorahub_mean``) next to its ``cell.json``; every LoraHub
run also keeps its ``recipe.json`` under ``<TASK>/lorahub_runs/seed_<s>/``. The table is rewritten
after each task. A rerun with the same settings skips every cell already written (resumable).

No Ray here: ``evaluate`` (default: in this process) may be :func:`lorahub_ray.api.evaluate_data`
bound to Ray Data workers, as the ``lorahub-ray bbh`` command does with ``--workers``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.learning import load_module_list, lorahub_learning
from lorahub_ray.core.model import load_base_model, load_model
from lorahub_ray.core.objective import FewShotObjective
from lorahub_ray.errors import LoraHubError
from lorahub_ray.evaluation.compare import InContextPrompt
from lorahub_ray.evaluation.evaluate import EvaluationResult, evaluate_local
from lorahub_ray.io import bigbench, bigbench_sdist, catalogue, storage
from lorahub_ray.io.examples import Examples, read_examples
from lorahub_ray.progress import progress_bar

METHODS = ("zero_shot", "icl", "lorahub_mean", "lorahub_best", "best_single")
SETTINGS_FILE = "bbh.json"
TABLE_FILE = "table.json"
PLOT_FILE = "table.png"
CELL_FILE = "cell.json"
PREDICTIONS_FILE = "predictions.parquet"
RUNS_DIR = "lorahub_runs"
# BBH's 27 tasks and their sources in bigbench==1.0.0; three are programmatic there (task.py only)
BBH_SOURCES = {
    "causal_judgement": "causal_judgment", "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa", "dyck_languages": "dyck_languages",
    "formal_fallacies": "formal_fallacies_syllogisms_negation", "geometric_shapes": "geometric_shapes",
    "hyperbaton": "hyperbaton", "logical_deduction_five_objects": "logical_deduction/five_objects",
    "logical_deduction_seven_objects": "logical_deduction/seven_objects",
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "movie_recommendation": "movie_recommendation", "navigate": "navigate", "object_counting": "object_counting",
    "penguins_in_a_table": "penguins_in_a_table", "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "ruin_names": "ruin_names", "salient_translation_error_detection": "salient_translation_error_detection",
    "snarks": "snarks", "sports_understanding": "sports_understanding", "temporal_sequences": "temporal_sequences",
    "tracking_shuffled_objects_five_objects": "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects_seven_objects": "tracking_shuffled_objects/seven_objects",
    "tracking_shuffled_objects_three_objects": "tracking_shuffled_objects/three_objects",
    "word_sorting": "word_sorting",
}
BBH_PROGRAMMATIC = ("boolean_expressions", "multistep_arithmetic_two", "web_of_lies")

Evaluate = Callable[..., EvaluationResult]


def resolve_task(entry: str) -> tuple[str, str]:
    """``(table name, BIG-bench source)`` of a ``--tasks`` entry: a BBH task name, or any BIG-bench
    source (``bigbench:TASK[/SUBTASK]``, a ``task.json`` or a task folder)."""
    if entry in BBH_SOURCES:
        return entry, bigbench.SCHEME + BBH_SOURCES[entry]
    if entry in BBH_PROGRAMMATIC:
        raise LoraHubError(f"BBH task '{entry}' has no source data in bigbench==1.0.0 (it is a programmatic "
                           f"task.py there; BBH generated its own examples)")
    if bigbench.is_bigbench(entry):
        return bigbench.task_files(bigbench.parse_source(entry).location)[0], entry.split("?", 1)[0]
    raise LoraHubError(f"task '{entry}' is neither a BBH task with data ({', '.join(BBH_SOURCES)}) nor a BIG-bench "
                       f"source (bigbench:TASK[/SUBTASK], a task.json or a task folder)")


def load_hub(hub: str, progress: bool = False):
    """A folder of adapters (or any module URI) or a Parquet catalogue, loaded and checked."""
    if str(hub).lower().endswith(".parquet"):
        return catalogue.load_selected(hub)
    return load_module_list([hub], progress)


def run_subsets(count: int, seeds: int, per_run: int) -> list[list[int]]:
    """The hub indices of each run: a random subset of ``per_run`` drawn with the run's seed, sorted."""
    k = min(per_run, count)
    return [sorted(random.Random(seed).sample(range(count), k)) for seed in range(seeds)]


# --- cells on disk -----------------------------------------------------------------------------------


def _cell(result: EvaluationResult, seconds: float, **extra) -> dict:
    m = result.metrics
    return {"accuracy": m["accuracy"], "tokens_per_example": m["input_tokens_per_example"], "seconds": seconds,
            "examples": m["examples"], **extra}


def _write_cell(folder: Path, cell: dict, columns: dict[str, list], extra: Callable[[Path], None] | None = None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    with storage.output_directory(folder, marker=CELL_FILE) as tmp:
        table = {"input": pa.array(columns["input"], pa.string()),
                 "target": pa.array(columns["target"], pa.string()),
                 "prediction": pa.array(columns["prediction"], pa.string()),
                 "correct": pa.array(columns["correct"], pa.bool_()),
                 "input_tokens": pa.array(columns["input_tokens"], pa.int64())}
        if "seed" in columns:
            table["seed"] = pa.array(columns["seed"], pa.int64())
        pq.write_table(pa.table(table), tmp / PREDICTIONS_FILE)
        if extra is not None:
            extra(tmp)
        (tmp / CELL_FILE).write_text(json.dumps(cell, indent=2) + "\n")
    return cell


def _read_cell(folder: Path) -> dict | None:
    path = folder / CELL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _check_settings(output: Path, settings: dict) -> None:
    path = output / SETTINGS_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            raise LoraHubError(f"output '{output}' holds a BBH table made with other settings "
                               f"({', '.join(f'{k}: {old.get(k)!r} there, {settings[k]!r} now' for k in changed)}); "
                               f"use another --output")
    else:
        storage.check_output(str(output), marker=SETTINGS_FILE)


def macro(tasks: dict[str, dict]) -> dict[str, dict]:
    out = {}
    for method in METHODS:
        cells = [t[method] for t in tasks.values() if method in t]
        if cells:
            out[method] = {k: sum(c[k] for c in cells) / len(cells) for k in ("accuracy", "tokens_per_example",
                                                                             "seconds")}
    return out


# --- the table -----------------------------------------------------------------------------------------


def bbh_table(model: str, hub: str, output: str | Path, *, tasks: Sequence[str] | None = None, seeds: int = 5,
              modules_per_run: int = 20, shots: int = bigbench.DEFAULT_SHOTS, split_seed: int = 0, budget: int = 40,
              optimizer: str = "NGOpt", batch_size: int = 32, max_new_tokens: int = 64, device: str | None = None,
              evaluate: Evaluate = evaluate_local, workers: int = 0, progress: bool = True) -> dict:
    """Write the BBH table for ``model`` and the modules of ``hub`` under ``output`` and return it
    (see the module's docstring). ``tasks`` default to every BBH task that has source data."""
    if seeds < 1 or modules_per_run < 1:
        raise LoraHubError(f"seeds and modules per run must be at least 1, got {seeds} and {modules_per_run}")
    output = Path(output).expanduser()
    settings = {"model": str(model), "hub": str(hub), "seeds": seeds, "modules_per_run": modules_per_run,
                "shots": shots, "split_seed": split_seed, "budget": budget, "optimizer": optimizer,
                "max_new_tokens": max_new_tokens}
    _check_settings(output, settings)
    # every input read and checked before any model loads
    entries = list(tasks) if tasks else list(BBH_SOURCES)
    in_sdist = [BBH_SOURCES.get(e, e.removeprefix(bigbench.SCHEME)).split("?")[0].split("/")[0] for e in entries
                if e in BBH_SOURCES or e.startswith(bigbench.SCHEME)]
    if in_sdist:
        bigbench_sdist.extract_tasks(in_sdist)  # one pass through the sdist for all of them
    plan = []
    for entry in entries:
        name, source = resolve_task(entry)
        if any(name == p[0] for p in plan):
            raise LoraHubError(f"task '{name}' is listed twice")
        query = f"?seed={split_seed}&shots={shots}"
        fewshot = read_examples(f"{source}{query}&split=fewshot")
        test = str(bigbench.materialize(f"{source}{query}&split=test"))
        plan.append((name, fewshot, test))
    modules = load_hub(hub, progress)
    subsets = run_subsets(len(modules), seeds, modules_per_run)
    output.mkdir(parents=True, exist_ok=True)
    _write_json(output / SETTINGS_FILE, settings)
    table = {"tasks": {}, "macro": {}}
    runner = _Runner(model, modules, subsets, output, evaluate=evaluate, workers=workers, device=device,
                     common=dict(batch_size=batch_size, max_new_tokens=max_new_tokens, device=device, progress=False),
                     budget=budget, optimizer=optimizer)
    with progress_bar("BBH table", len(plan) * len(METHODS), enabled=progress) as advance:
        for name, fewshot, test in plan:
            table["tasks"][name] = runner.task(name, fewshot, test, advance)
            table["macro"] = macro(table["tasks"])
            _write_json(output / TABLE_FILE, table)
            plot(table, output / PLOT_FILE)
    runner.close()
    return table


class _Runner:
    """The cells of one task after another, sharing the base model loaded once (in-process)."""

    def __init__(self, model, modules, subsets, output: Path, *, evaluate: Evaluate, workers: int, device, common,
                 budget: int, optimizer: str):
        self.model, self.modules, self.subsets, self.output = model, modules, subsets, output
        self.evaluate, self.workers, self.device, self.common = evaluate, workers, device, common
        self.budget, self.optimizer = budget, optimizer
        self._base = None

    def close(self) -> None:
        self._base = None

    def _eval_base(self, data: str, transform=None) -> EvaluationResult:
        if self.workers:
            return self.evaluate(self.model, data, transform=transform, **self.common)
        if self._base is None:
            self._base = load_model(self.model, device=self.device)
        model, tokenizer = self._base
        return self.evaluate(model, data, tokenizer=tokenizer, transform=transform, **self.common)

    def _eval_merged(self, merged, tokenizer, data: str, folder: Path) -> EvaluationResult:
        if not self.workers:
            return self.evaluate(merged, data, tokenizer=tokenizer, **self.common)
        saved = folder.parent / f".model-{folder.name}-{uuid.uuid4().hex[:8]}"  # Ray workers load it from disk
        try:
            merged.save_pretrained(saved)
            tokenizer.save_pretrained(saved)
            return self.evaluate(str(saved), data, **self.common)
        finally:
            shutil.rmtree(saved, ignore_errors=True)

    def task(self, name: str, fewshot: Examples, test: str, advance) -> dict:
        where = self.output / name
        cells: dict[str, dict] = {}
        for method, transform in (("zero_shot", None), ("icl", InContextPrompt.from_examples(fewshot))):
            cells[method] = _read_cell(where / method) or self._timed(
                where / method, lambda: self._eval_base(test, transform))
            advance(info=f"{name} {method}")
        mean, best = _read_cell(where / "lorahub_mean"), _read_cell(where / "lorahub_best")
        if mean is None or best is None:  # the runs themselves are cells too, each written once
            runs = [self._run(name, fewshot, test, seed) for seed in range(len(self.subsets))]
            mean = mean or self._mean(where, runs)
            top = max(range(len(runs)), key=lambda s: (runs[s]["accuracy"], -s))
            best = best or self._copy_run(where, top, runs[top])
        cells["lorahub_mean"] = mean
        advance(info=f"{name} lorahub_mean")
        cells["lorahub_best"] = best
        advance(info=f"{name} lorahub_best")
        cells["best_single"] = _read_cell(where / "best_single") or self._best_single(where, fewshot, test)
        advance(info=f"{name} best_single")
        return cells

    def _timed(self, folder: Path, fn: Callable[[], EvaluationResult]) -> dict:
        start = time.perf_counter()
        result = fn()
        return _write_cell(folder, _cell(result, time.perf_counter() - start), result.predictions)

    def _run(self, name: str, fewshot: Examples, test: str, seed: int) -> dict:
        folder = self.output / name / RUNS_DIR / f"seed_{seed}"
        done = _read_cell(folder)
        if done is not None:
            return done
        start = time.perf_counter()
        subset = [self.modules[i] for i in self.subsets[seed]]
        learned = lorahub_learning(self.model, subset, fewshot, budget=self.budget, optimizer=self.optimizer,
                                   seed=seed, device=self.device, progress=False)
        result = self._eval_merged(learned.model, learned.tokenizer, test, folder)
        cell = _cell(result, time.perf_counter() - start, seed=seed, weights=learned.weights)
        return _write_cell(folder, cell, result.predictions, extra=learned.recipe.save)

    def _mean(self, where: Path, runs: list[dict]) -> dict:
        import pyarrow.parquet as pq

        columns: dict[str, list] = {}
        for run in runs:
            part = pq.read_table(where / RUNS_DIR / f"seed_{run['seed']}" / PREDICTIONS_FILE).to_pydict()
            part["seed"] = [run["seed"]] * len(part["input"])
            for k, v in part.items():
                columns.setdefault(k, []).extend(v)
        cell = {k: sum(r[k] for r in runs) / len(runs) for k in ("accuracy", "tokens_per_example", "seconds")}
        cell.update(examples=runs[0]["examples"], runs={str(r["seed"]): r["accuracy"] for r in runs})
        return _write_cell(where / "lorahub_mean", cell, columns)

    def _copy_run(self, where: Path, seed: int, run: dict) -> dict:
        import pyarrow.parquet as pq

        columns = pq.read_table(where / RUNS_DIR / f"seed_{seed}" / PREDICTIONS_FILE).to_pydict()
        return _write_cell(where / "lorahub_best", dict(run), columns)

    def _best_single(self, where: Path, fewshot: Examples, test: str) -> dict:
        start = time.perf_counter()
        base, tokenizer, _ = load_base_model(self.model, device=self.device)
        composer = LoraComposer(base, self.modules)
        objective = FewShotObjective(composer, tokenizer, fewshot.inputs, fewshot.outputs)
        n = len(self.modules)
        one_hot = [[1.0 if j == i else 0.0 for j in range(n)] for i in range(n)]
        losses = [objective.loss(w) for w in one_hot]
        best = min(range(n), key=lambda i: (losses[i], i))
        merged = composer.merge_and_unload(one_hot[best])
        result = self._eval_merged(merged, tokenizer, test, where / "best_single")
        cell = _cell(result, time.perf_counter() - start, module=self.modules[best].name, loss=losses[best])
        return _write_cell(where / "best_single", cell, result.predictions)


def plot(table: dict, path: Path) -> Path:
    """Accuracy per task and method, with the macro average last, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table["tasks"].items()) + [("macro average", table["macro"])]
    methods = [m for m in METHODS if any(m in cells for _, cells in rows)]
    colors = dict(zip(METHODS, ["#9e9e9e", "#5c6bc0", "#ef6c00", "#ffb74d", "#26a69a"]))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(rows))]
        ys = [cells.get(method, {}).get("accuracy", 0.0) for _, cells in rows]
        ax.bar(xs, ys, width, label=method, color=colors[method])
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper left")
    ax.set_title("BBH (rebuilt from BIG-bench sources): zero-shot, ICL, LoraHub, best single module")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
