"""The cells of one task of the BBH table (see :mod:`.bbh` for what each method is): computed,
written to ``<output>/<TASK>/<METHOD>/`` (``cell.json`` beside ``predictions.parquet``) and read
back on a rerun, so that a table resumes cell by cell. Also the two baselines that need no model
and the 95% Wilson interval of a cell's accuracy.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.learning import lorahub_learning, write_run
from lorahub_ray.core.model import load_base_model, load_model
from lorahub_ray.core.objective import FewShotObjective
from lorahub_ray.core.preselect import screen
from lorahub_ray.core.selection import SelectionConfig, sequential
from lorahub_ray.errors import LoraHubError
from lorahub_ray.evaluation.compare import InContextPrompt
from lorahub_ray.evaluation.evaluate import EvaluationResult
from lorahub_ray.evaluation.generate import normalize
from lorahub_ray.evaluation.options import answer_options, option_accuracy
from lorahub_ray.io import storage
from lorahub_ray.io.examples import Examples, read_examples

# select cv's cells: one set of folds ranked by each config, computed in this order (the folds run with answer sets
# first: their results also hold the token-mean cross-entropy that the other rankings use). The answer-set column
# keeps the rule it was measured with since it was added, the one-SE rule.
SELECT_CELLS = (("select_cv_answers", SelectionConfig(answers=True, rule="one-se")), ("select_cv", SelectionConfig()),
                ("select_cv_one_se", SelectionConfig(rule="one-se")))
METHODS = ("zero_shot", "icl", "lorahub_mean", "lorahub_best", "best_single", "select_cv", "select_cv_one_se",
           "select_cv_answers")
BASELINES = ("chance", "majority")
CELL_FILE = "cell.json"
PREDICTIONS_FILE = "predictions.parquet"
RUNS_DIR = "lorahub_runs"
SINGLES_PER_PASS = 8  # best_single: modules scored alone in one shared forward pass

Evaluate = Callable[..., EvaluationResult]


def wilson(correct: float, n: int, z: float = 1.96) -> list[float]:
    """The 95% Wilson score interval of ``correct`` successes in ``n``, in percent."""
    if n <= 0:
        return [0.0, 100.0]
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2)]


def _cell(result: EvaluationResult, seconds: float, options: dict | None = None, **extra) -> dict:
    m = result.metrics
    cell = {"accuracy": m["accuracy"], "ci95": wilson(m["accuracy"] * m["examples"] / 100, m["examples"]),
            "tokens_per_example": m["input_tokens_per_example"], "seconds": seconds, "examples": m["examples"]}
    if options is not None:
        cell["option_accuracy"] = options["accuracy"]
    return {**cell, **extra}


def baselines(test: str) -> dict[str, dict]:
    """The ``chance`` and ``majority`` cells of a test set (no model)."""
    from collections import Counter

    data = read_examples(test)
    n = len(data)
    offered = [answer_options(x) for x in data.inputs]
    chance = 100.0 * sum(1 / len(o) for o in offered if o) / n
    top = Counter(normalize(y) for y in data.outputs).most_common(1)[0]
    cells = {}
    for name, accuracy, extra in (("chance", chance, {}), ("majority", 100.0 * top[1] / n, {"answer": top[0]})):
        cells[name] = {"accuracy": accuracy, "ci95": wilson(accuracy * n / 100, n), "tokens_per_example": 0.0,
                       "seconds": 0.0, "examples": n, **extra}
    return cells


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



def check_select_cells(task: Path) -> None:
    """Refuse, naming it, a select cell of ``task`` written before whose recipe was not ranked as its column ranks
    now (rule, score, answer sets): one written when the column meant another config, never a silent mix in the
    table. The BBH table calls it for every task before any model loads; the cells then read as any other."""
    want_keys = ("rule", "score", "answers")
    for method, config in SELECT_CELLS:
        folder = task / method
        if _read_cell(folder) is None:
            continue
        recipe = folder / "recipe.json"
        ranked = json.loads(recipe.read_text())["search"]["selection"]["config"] if recipe.is_file() else {}
        want = {key: getattr(config, key) for key in want_keys}
        got = {key: ranked.get(key) for key in want_keys}
        if got != want:
            column = next((m for m, c in SELECT_CELLS if {k: getattr(c, k) for k in want_keys} == got), None)
            where = f"it belongs in {task / column}" if column else "no column holds that ranking now"
            raise LoraHubError(f"{folder} holds select cv ranked by {got}, but this column is ranked by {want} "
                               f"({where}): move it there or delete it, and rerun")


class TaskCells:
    """The cells of one task after another, sharing the base model loaded once (in-process)."""

    def __init__(self, model, modules, subsets, output: Path, *, evaluate: Evaluate, workers: int, device, common,
                 budget: int, optimizer: str, template: str, map_folds=None):
        self.model, self.modules, self.subsets, self.output = model, modules, subsets, output
        self.map_folds = map_folds  # where select_cv's folds run (None: in this process)
        self.evaluate, self.workers, self.device, self.common = evaluate, workers, device, common
        self.budget, self.optimizer, self.template = budget, optimizer, template
        self._base = None

    def close(self) -> None:
        self._base = None

    def _base_model(self):
        if self._base is None:
            self._base = load_model(self.model, device=self.device)
        return self._base

    def _options(self, load, data: str, transform=None) -> dict | None:
        """Option log-likelihood accuracy on ``data`` (in this process) with the ``(model, tokenizer)``
        that ``load()`` gives, for a multiple-choice task; a generative one loads nothing."""
        test = read_examples(data)
        if not any(answer_options(x) for x in test.inputs):
            return None
        inputs = [transform(x) for x in test.inputs] if transform else test.inputs
        model, tokenizer = load()
        return option_accuracy(model, tokenizer, inputs, test.outputs, template=self.template,
                               batch_size=self.common["batch_size"])

    def _eval_base(self, data: str, transform=None) -> tuple[EvaluationResult, dict | None]:
        options = self._options(self._base_model, data, transform)
        if self.workers:
            return self.evaluate(self.model, data, transform=transform, **self.common), options
        model, tokenizer = self._base_model()
        return self.evaluate(model, data, tokenizer=tokenizer, transform=transform, **self.common), options

    def _eval_merged(self, merged, tokenizer, data: str, folder: Path) -> tuple[EvaluationResult, dict | None]:
        options = self._options(lambda: (merged, tokenizer), data)
        if not self.workers:
            return self.evaluate(merged, data, tokenizer=tokenizer, **self.common), options
        saved = folder.parent / f".model-{folder.name}-{uuid.uuid4().hex[:8]}"  # Ray workers load it from disk
        try:
            merged.save_pretrained(saved)
            tokenizer.save_pretrained(saved)
            return self.evaluate(str(saved), data, **self.common), options
        finally:
            shutil.rmtree(saved, ignore_errors=True)

    def task(self, name: str, fewshot: Examples, test: str, advance) -> dict:
        """The task's cells, each read from ``output/name`` when a run wrote it before, else computed and
        written; ``advance`` counts a computed cell as done and a read one as skipped (see ``progress_bar``)."""
        where = self.output / name
        cells: dict[str, dict] = baselines(test)

        def done(method: str, read: bool) -> None:
            advance(0 if read else 1, skip=1 if read else 0, info=f"{name} {method}")

        for method, transform in (("zero_shot", None), ("icl", InContextPrompt.from_examples(fewshot))):
            cell = _read_cell(where / method)
            cells[method] = cell or self._timed(where / method, lambda: self._eval_base(test, transform))
            done(method, cell is not None)
        mean, best = _read_cell(where / "lorahub_mean"), _read_cell(where / "lorahub_best")
        read = mean is not None and best is not None
        if not read:  # the runs themselves are cells too, each written once
            runs = []
            for seed in range(len(self.subsets)):
                runs.append(self._run(name, fewshot, test, seed))
                advance(0, info=f"{name} lorahub run {seed + 1}/{len(self.subsets)}")  # the longest cells
            mean = mean or self._mean(where, runs)
            top = max(range(len(runs)), key=lambda s: (runs[s]["accuracy"], -s))
            best = best or self._copy_run(where, top, runs[top])
        cells["lorahub_mean"] = mean
        done("lorahub_mean", read)
        cells["lorahub_best"] = best
        done("lorahub_best", read)
        cell = _read_cell(where / "best_single")
        cells["best_single"] = cell or self._best_single(where, fewshot, test)
        done("best_single", cell is not None)
        select = {method: _read_cell(where / method) for method, _ in SELECT_CELLS}  # checked up front
        read = all(cell is not None for cell in select.values())
        if not read:
            select = self._select_cv(where, fewshot, test, select)
        for method in (m for m in METHODS if m in select):  # in the table's order
            cells[method] = select[method]
            done(method, read)
        return cells

    def _timed(self, folder: Path, fn) -> dict:
        start = time.perf_counter()
        result, options = fn()
        return _write_cell(folder, _cell(result, time.perf_counter() - start, options), result.predictions)

    def _learn(self, modules, fewshot: Examples, seed: int, **options):
        return lorahub_learning(self.model, modules, fewshot, budget=self.budget, optimizer=self.optimizer, seed=seed,
                                device=self.device, template=self.template, progress=False, **options)

    def _run(self, name: str, fewshot: Examples, test: str, seed: int) -> dict:
        folder = self.output / name / RUNS_DIR / f"seed_{seed}"
        done = _read_cell(folder)
        if done is not None:
            return done
        start = time.perf_counter()
        learned = self._learn([self.modules[i] for i in self.subsets[seed]], fewshot, seed)
        result, options = self._eval_merged(learned.model, learned.tokenizer, test, folder)
        cell = _cell(result, time.perf_counter() - start, options, seed=seed, weights=learned.weights)
        return _write_cell(folder, cell, result.predictions, extra=_run_files(learned))

    def _mean(self, where: Path, runs: list[dict]) -> dict:
        columns: dict[str, list] = {}
        for run in runs:
            part = _predictions(where / RUNS_DIR / f"seed_{run['seed']}")
            part["seed"] = [run["seed"]] * len(part["input"])
            for k, v in part.items():
                columns.setdefault(k, []).extend(v)
        keys = ("accuracy", "tokens_per_example", "seconds") + (("option_accuracy",) if "option_accuracy" in runs[0]
                                                                else ())
        cell = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
        cell["ci95"] = wilson(sum(columns["correct"]), len(columns["correct"]))
        cell.update(examples=runs[0]["examples"], runs={str(r["seed"]): r["accuracy"] for r in runs})
        return _write_cell(where / "lorahub_mean", cell, columns)

    def _copy_run(self, where: Path, seed: int, run: dict) -> dict:
        return _write_cell(where / "lorahub_best", dict(run), _predictions(where / RUNS_DIR / f"seed_{seed}"))

    def _best_single(self, where: Path, fewshot: Examples, test: str) -> dict:
        start = time.perf_counter()
        base, tokenizer, _ = load_base_model(self.model, device=self.device)
        composer = LoraComposer(base, self.modules)
        objective = FewShotObjective(composer, tokenizer, fewshot.inputs, fewshot.outputs, template=self.template)
        n = len(self.modules)
        losses = screen(objective, n, chunk=SINGLES_PER_PASS)  # each module alone, no regulariser
        best = min(range(n), key=lambda i: (losses[i], i))
        merged = composer.merge_and_unload([float(j == best) for j in range(n)])
        result, options = self._eval_merged(merged, tokenizer, test, where / "best_single")
        cell = _cell(result, time.perf_counter() - start, options, module=self.modules[best].name, loss=losses[best])
        return _write_cell(where / "best_single", cell, result.predictions)

    def _select_cv(self, where: Path, fewshot: Examples, test: str, done: dict[str, dict | None]) -> dict[str, dict]:
        """The cells of :data:`SELECT_CELLS` not ``done`` yet: ``lorahub_learning(select="cv")`` with each config, on
        folds that run once (with answer sets: their results hold each candidate's token-mean cross-entropy too,
        which the other configs rank by; folds run without answer sets would hold no answer-set loss to rank). A
        later winner costs its refit, and its evaluation only where its weights differ from every earlier one's."""
        folds = _KeptFolds(self.map_folds or sequential)
        cells = dict(done)
        for method, config in SELECT_CELLS:
            if cells.get(method) is not None:
                continue
            start = time.perf_counter()
            learned = self._learn(self.modules, fewshot, 0, select="cv", selection=config, map_folds=folds)
            report = learned.recipe.search["selection"]
            extra = dict(winner=report["winner"], reason=report["reason"], weights=learned.weights)
            same = next((m for m, c in cells.items() if c is not None and c["weights"] == learned.weights), None)
            if same is not None:
                columns = _predictions(where / same)  # the same model: its evaluation, not another
                cells[method] = _write_cell(where / method,
                                            {**cells[same], **extra, "seconds": time.perf_counter() - start},
                                            columns, extra=_run_files(learned))
                continue
            result, options = self._eval_merged(learned.model, learned.tokenizer, test, where / method)
            cell = _cell(result, time.perf_counter() - start, options, **extra)
            cells[method] = _write_cell(where / method, cell, result.predictions, extra=_run_files(learned))
        return cells


class _KeptFolds:
    """A ``map_folds`` that runs the folds once (through ``inner``) and gives the same results to a second
    selection over the same examples (whose cell's seconds then leave the folds out)."""

    def __init__(self, inner):
        self.inner, self.results = inner, None

    def __call__(self, context, tasks):
        if self.results is None:
            self.results = list(self.inner(context, tasks))
        return self.results

    def __getattr__(self, name):  # describe() and the like: the inner backend's
        return getattr(self.inner, name)


def _predictions(folder: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    return pq.read_table(folder / PREDICTIONS_FILE).to_pydict()


def _run_files(learned) -> Callable[[Path], None]:
    """A LoraHub run's recipe.json and adapter/ beside its cell: a run directory that ``evaluate``,
    ``serve`` and ``load_model`` take."""
    return lambda directory: write_run(directory, learned.recipe, learned.modules)
