"""The paper's BBH table in one call: zero-shot, ICL, LoraHub (mean and best over seeds), the best
single module and ``--select cv``, for each task, beside the chance and majority baselines.

``tasks`` are BBH task names (the authors' release, ``bbh:TASK``, :mod:`lorahub_ray.io.bbh`), any task
source (:mod:`lorahub_ray.io.sources`: ``reasoning-gym:NAME[?config]``, ``bigbench:TASK[/SUBTASK]``, ...),
or a suite: ``bbh`` (the default: all 27 BBH tasks), ``transfer`` (:data:`TRANSFER_SUITE`: held-out
neighbours of the reasoning-gym tasks that :data:`lorahub_ray.evaluation.hub_build.UPSTREAM` trains modules
on, where a small model can show skill transfer) or ``bbh-bigbench`` (the earlier rebuild of 24 BBH tasks
from BIG-bench's sources, :data:`BBH_SOURCES`, for those who have that data). For every task: the
few-shot examples (``shots``, 5) and the test set (up to ``test_size``, at most 250) are the seeded,
disjoint splits of its source, with ``split_seed`` (``None``: each source's own default, which for BBH is
the paper's draw, :data:`lorahub_ray.io.bbh.PAPER_SEED`). Then, one *cell* per method:

``zero_shot``     the base model on each test input;
``icl``           the base model with the few-shot examples prepended (:func:`.compare.icl_prompt`);
``lorahub_mean``  LoraHub learning (budget 40, NGOpt) run with seeds 0..``seeds``-1, each over a random
                  subset of ``modules_per_run`` (20) modules of the hub drawn with its seed, in the order
                  drawn (the same subsets for every task), as the paper's protocol: the mean over the runs;
``lorahub_best``  the best of those runs on the test set (the paper's "best", an oracle over seeds);
``best_single``   the one module (weight 1) with the lowest few-shot loss (the reference's loss);
``select_cv``     ``lorahub_learning(select="cv")`` over the whole hub, seed 0: the base model, each
                  module alone and three searches, scored by leave-one-out loss on the few-shot
                  examples, ranked by the default rule (``paired``: the reference search, ``lorahub``,
                  unless a candidate's held-out loss beats it fold by fold by more than one standard
                  error of the differences) and refit on all of them (:mod:`lorahub_ray.core.selection`);
                  the cell records the winner and its reason;
``select_cv_one_se``   the same folds ranked by ``rule="one-se"`` (the simplest candidate within one
                  standard error of the lowest loss; the default until the real tasks showed it below
                  ``paired``, docs/bbh.md);
``select_cv_answers``  the same folds ranked by ``rule="one-se"`` with each example that has an answer
                  set scored by its right answer among them (``answers=True``, not the default: see
                  docs/bbh.md), to show what that scoring does on each task; the three share one run of
                  the folds, and one evaluation where they pick the same weights. A rerun refuses a select
                  cell written under another ranking (a column whose meaning changed), naming it.

Two baselines need no model: ``chance`` (the mean of 1/options over the test set; 0 for a generative
task) and ``majority`` (always the test set's most common answer: the best any constant answer does).

A cell holds accuracy (exact match, percent, normalised as the reference) with its 95% Wilson
interval ``ci95`` over the test examples (pooled over the runs for ``lorahub_mean``), input tokens
per example and seconds (wall time of the cell: the evaluation, plus the search for LoraHub; per
run for ``lorahub_mean``). For a multiple-choice task it also holds ``option_accuracy``: the
accuracy of the most likely option letter (:mod:`.options`), which credits a model that knows the
answer but does not write it in the expected form. Every prompt is rendered with ``template``
(``chat`` for an instruct model), the searches' included. ``output`` receives ``bbh.json`` (the settings), ``table.json``
(``{"tasks": {TASK: {METHOD: cell}}, "macro": {METHOD: cell}}``, the macro average over the tasks),
``table.png`` and ``<TASK>/<METHOD>/predictions.parquet`` (input, target, prediction, correct,
input_tokens; with a ``seed`` column for ``lorahub_mean``) next to its ``cell.json``; every LoraHub
run also keeps its ``recipe.json`` and ``adapter/`` (a run directory, as ``search`` writes one: ``evaluate``
and ``serve`` take it) under ``<TASK>/lorahub_runs/seed_<s>/``, ``select_cv`` in its cell. The table is rewritten
after each task. A rerun with the same settings skips every cell already written (resumable).

No Ray here: ``evaluate`` (default: in this process) may be :func:`lorahub_ray.api.evaluate_data`
bound to Ray Data workers, as the ``lorahub-ray bbh`` command does with ``--workers``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

from lorahub_ray.core.learning import load_module_list
from lorahub_ray.core.templates import check_template
from lorahub_ray.errors import LoraHubError, did_you_mean
from lorahub_ray.evaluation.bbh_cells import BASELINES, METHODS, Evaluate, TaskCells, check_select_cells
from lorahub_ray.evaluation.evaluate import evaluate_local
from lorahub_ray.io import bbh, bigbench, catalogue, sources, storage
from lorahub_ray.io.examples import read_examples
from lorahub_ray.progress import progress_bar

SETTINGS_FILE = "bbh.json"
TABLE_FILE = "table.json"
PLOT_FILE = "table.png"
# the sources in bigbench==1.0.0 of 24 of BBH's 27 tasks (the rest are programmatic there, task.py only): a
# rebuild, not BBH's own sets (those are bbh:TASK)
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
# unseen neighbours of the upstream hub's tasks (hub_build.UPSTREAM holds none of these generators)
TRANSFER_SUITE = (
    "reasoning-gym:word_sequence_reversal?min_words=9&max_words=12",  # the hub: 3 to 8 words
    "reasoning-gym:lcm",  # held out; the hub: gcd, prime_factorization
    "reasoning-gym:chain_sum?max_terms=3&max_digits=2",  # held out (BBH's arithmetic); the hub: products, ...
    "reasoning-gym:ransom_note",  # held out; the hub: isomorphic_strings, another True/False string test
)
SUITES = {"bbh": tuple(bbh.TASKS), "transfer": TRANSFER_SUITE,
          "bbh-bigbench": tuple(bigbench.SCHEME + source for source in BBH_SOURCES.values())}


def resolve_task(entry: str) -> tuple[str, str]:
    """``(table name, task source)`` of a ``--tasks`` entry: a BBH task name (its release, ``bbh:TASK``),
    or any task source."""
    if entry in bbh.TASKS:
        return entry, bbh.SCHEME + entry
    if sources.is_source(entry):
        return sources.task_name(entry), entry
    hint = did_you_mean(entry, [*bbh.TASKS, *SUITES])
    raise LoraHubError(f"task '{entry}' is neither a BBH task nor a task source (bbh:TASK, "
                       f"reasoning-gym:NAME[?config], bigbench:TASK[/SUBTASK], a task.json or a task folder) nor a "
                       f"suite ({', '.join(SUITES)}){hint}")


def load_hub(hub: str, progress: bool = False):
    """A folder of adapters (or any module URI) or a Parquet catalogue, loaded and checked."""
    if str(hub).lower().endswith(".parquet"):
        return catalogue.load_selected(hub)
    return load_module_list([hub], progress)


def run_subsets(count: int, seeds: int, per_run: int) -> list[list[int]]:
    """The hub indices of each run: ``random.sample`` of ``per_run`` with the run's seed, in the order drawn,
    as the reference's ``random.sample(modules, 20)``. The order matters (Cobyla's first probes step through
    the weights in list order), so with ``per_run`` ≥ the hub's size the runs still differ: by their order."""
    k = min(per_run, count)
    return [random.Random(seed).sample(range(count), k) for seed in range(seeds)]


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
    for method in BASELINES + METHODS:
        cells = [t[method] for t in tasks.values() if method in t]
        if cells:
            out[method] = {k: sum(c[k] for c in cells) / len(cells) for k in ("accuracy", "tokens_per_example",
                                                                             "seconds")}
            scored = [c["option_accuracy"] for c in cells if "option_accuracy" in c]
            if scored:
                out[method]["option_accuracy"] = sum(scored) / len(scored)
                out[method]["option_tasks"] = len(scored)
    return out


def expand_tasks(tasks: Sequence[str] | None) -> list[str]:
    """``tasks`` with each suite name (:data:`SUITES`) replaced by its tasks; the default is ``bbh``."""
    out = []
    for entry in tasks or ["bbh"]:
        out.extend(SUITES.get(entry, (entry,)))
    return out


# --- the table -----------------------------------------------------------------------------------------


def bbh_table(model: str, hub: str, output: str | Path, *, tasks: Sequence[str] | None = None, seeds: int = 5,
              modules_per_run: int = 20, shots: int = sources.DEFAULT_SHOTS, split_seed: int | None = None,
              budget: int = 40,
              optimizer: str = "NGOpt", batch_size: int = 32, max_new_tokens: int = 64, device: str | None = None,
              template: str = "plain", test_size: int = sources.TEST_SIZE, evaluate: Evaluate = evaluate_local,
              workers: int = 0, map_folds=None, progress: bool = True) -> dict:
    """Write the BBH table for ``model`` and the modules of ``hub`` under ``output`` and return it
    (see the module's docstring). ``tasks`` default to all 27 BBH tasks."""
    if seeds < 1 or modules_per_run < 1:
        raise LoraHubError(f"seeds and modules per run must be at least 1, got {seeds} and {modules_per_run}")
    if not 1 <= test_size <= sources.TEST_SIZE:
        raise LoraHubError(f"test size must be between 1 and {sources.TEST_SIZE}, got {test_size}")
    check_template(template)
    output = Path(output).expanduser()
    settings = {"model": str(model), "hub": str(hub), "seeds": seeds, "modules_per_run": modules_per_run,
                "shots": shots, "split_seed": split_seed, "budget": budget, "optimizer": optimizer,
                "max_new_tokens": max_new_tokens, "template": template, "test_size": test_size,
                "module_order": "drawn"}  # tables made before this key had sorted subsets
    _check_settings(output, settings)
    # every input read and checked before any model loads
    entries = expand_tasks(tasks)
    resolved = [resolve_task(entry) for entry in entries]
    sources.prepare([source for _, source in resolved])  # one download or extraction for all of them
    plan = []
    for name, source in resolved:
        if any(name == p[0] for p in plan):
            raise LoraHubError(f"task '{name}' is listed twice")
        split = dict(seed=split_seed, shots=shots, size=test_size)
        fewshot = read_examples(sources.with_split(source, "fewshot", **split))
        test = str(sources.materialize(sources.with_split(source, "test", **split)))
        check_select_cells(output / name)  # a cell written under another ranking: before any model loads
        plan.append((name, fewshot, test))
    modules = load_hub(hub, progress)
    subsets = run_subsets(len(modules), seeds, modules_per_run)
    output.mkdir(parents=True, exist_ok=True)
    storage.write_json(output / SETTINGS_FILE, settings)
    table = {"tasks": {}, "macro": {}}
    runner = TaskCells(model, modules, subsets, output, evaluate=evaluate, workers=workers, device=device,
                     common=dict(batch_size=batch_size, max_new_tokens=max_new_tokens, device=device, progress=False,
                                 template=template),
                     budget=budget, optimizer=optimizer, template=template, map_folds=map_folds)
    with progress_bar("BBH table", len(plan) * len(METHODS), enabled=progress) as advance:
        for name, fewshot, test in plan:
            table["tasks"][name] = runner.task(name, fewshot, test, advance)
            table["macro"] = macro(table["tasks"])
            storage.write_json(output / TABLE_FILE, table)
            plot(table, output / PLOT_FILE)
    runner.close()
    return table


def plot(table: dict, path: Path) -> Path:
    """Accuracy per task and method, with the macro average last, as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table["tasks"].items()) + [("macro average", table["macro"])]
    methods = [m for m in METHODS if any(m in cells for _, cells in rows)]
    colors = dict(zip(METHODS, ["#9e9e9e", "#5c6bc0", "#ef6c00", "#ffb74d", "#26a69a", "#8e24aa", "#ab47bc", "#ce93d8"]))
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.2))
    for k, method in enumerate(methods):
        xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(rows))]
        ys = [cells.get(method, {}).get("accuracy", 0.0) for _, cells in rows]
        ax.bar(xs, ys, width, label=method, color=colors[method])
    for style, baseline in (("--", "majority"), (":", "chance")):  # a line across each task's bars
        for i, (_, cells) in enumerate(rows):
            if baseline in cells:
                ax.hlines(cells[baseline]["accuracy"], i - 0.45, i + 0.45, colors="black", linestyles=style,
                          linewidth=1, label=baseline if i == 0 else None)
    ax.set_xticks(range(len(rows)), [name for name, _ in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper left")
    ax.set_title("zero-shot, ICL, LoraHub, best single module, select cv (lines: baselines)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
