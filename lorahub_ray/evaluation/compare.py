"""The paper's comparison in one call: zero-shot, few-shot in-context learning and LoraHub on one test set.

Three arms, evaluated on the same test set with the same batching plan (in-process or sharded
with Ray Data, see :mod:`lorahub_ray.evaluation.evaluate`):

``zero-shot``
    the base model alone on each test input;
``ICL``
    the base model on each test input with the few-shot examples prepended (the paper's
    in-context learning baseline), in the format of :func:`icl_prompt`;
``LoraHub``
    the run's composed model (as :func:`lorahub_ray.core.model.load_model` loads it: its ``model/``,
    else the base model with its ``adapter/`` merged in) on each test input.

For each: accuracy (exact match, percent), input tokens per example and examples per second.
The table the paper's headline claim rests on: LoraHub near ICL accuracy at zero-shot token cost.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lorahub_ray.io import storage
from lorahub_ray.io.examples import Examples, as_examples
from lorahub_ray.errors import LoraHubError
from lorahub_ray.evaluation.evaluate import EvaluationResult, evaluate_local, model_template, read_tasks, write_results
from lorahub_ray.core.recipe import RECIPE_FILE, run_files
from lorahub_ray.plots import plot_comparison

COMPARE_FILE = "compare.json"
PLOT_FILE = "compare.png"
EXAMPLE_SEPARATOR = "\n\n"


def icl_prompt(inputs, outputs, text: str) -> str:
    """The in-context prompt: every few-shot example as ``input`` newline ``output``, the
    examples separated by a blank line, then a blank line and the test input::

        {input 1}\\n{output 1}\\n\\n{input 2}\\n{output 2}\\n\\n...\\n\\n{test input}
    """
    shots = EXAMPLE_SEPARATOR.join(f"{i}\n{o}" for i, o in zip(inputs, outputs))
    return f"{shots}{EXAMPLE_SEPARATOR}{text}" if shots else text


@dataclass(frozen=True)
class InContextPrompt:
    """``text -> icl_prompt(examples, text)``, picklable for Ray workers."""

    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @classmethod
    def from_examples(cls, examples: Examples) -> "InContextPrompt":
        return cls(tuple(examples.inputs), tuple(examples.outputs))

    def __call__(self, text: str) -> str:
        return icl_prompt(self.inputs, self.outputs, text)


def _recipe_model(recipe: str | Path) -> str:
    uri = str(recipe) if storage.is_remote(str(recipe)) else str(Path(recipe).expanduser())
    if run_files(uri) is None:
        raise LoraHubError(f"recipe '{recipe}' is not a lorahub-ray output directory (no {RECIPE_FILE})")
    return uri


def compare(model: str, recipe: str | Path, examples, data: str, *, output: str | Path | None = None,
            evaluate=evaluate_local, workers: int = 0, batch_size: int = 32, max_new_tokens: int = 64,
            input_field: str = "input", output_field: str = "output", device: str | None = None,
            template: str | None = None, progress: bool = True) -> dict:
    """Zero-shot, ICL and LoraHub on ``data``; returns ``{"arms": {arm: metrics}, ...}`` and, with
    ``output``, writes ``compare.json``, ``compare.png`` and each arm's ``predictions.parquet``
    and ``metrics.json`` under ``output/<arm>/``. ``evaluate(model, data, **options)`` runs each arm:
    in this process by default, or :func:`lorahub_ray.api.evaluate_data` bound to Ray workers
    (``workers`` is then recorded in the report). Every arm renders its prompts with ``template``
    (default: the recipe's), the in-context prompt of ICL as one user turn under ``chat``."""
    # every input is checked before any model loads
    lorahub_model = _recipe_model(recipe)
    shots = as_examples(examples, input_field=input_field, output_field=output_field)
    read_tasks(data, input_field=input_field, output_field=output_field)
    prompt = InContextPrompt.from_examples(shots)
    template = model_template(lorahub_model, template)
    common = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, input_field=input_field,
                  output_field=output_field, device=device, template=template, progress=progress)
    results: dict[str, EvaluationResult] = {
        "zero-shot": evaluate(model, data, **common),
        "ICL": evaluate(model, data, transform=prompt, **common),
        "LoraHub": evaluate(lorahub_model, data, **common),
    }
    report = {
        "model": str(model), "recipe": str(recipe), "examples": len(shots), "data": str(data),
        "workers": workers, "template": template,
        "arms": {arm: {k: r.metrics[k] for k in ("accuracy", "macro_accuracy", "input_tokens_per_example",
                                                 "examples_per_second", "examples", "seconds", "tasks")}
                 for arm, r in results.items()},
    }
    if output is not None:
        with storage.output_directory(output, marker=COMPARE_FILE) as tmp:
            for arm, r in results.items():
                write_results(tmp / arm, r)
            plot_comparison(report, tmp / PLOT_FILE)
            (tmp / COMPARE_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def format_table(report: dict):
    """A rich table of the comparison."""
    from rich.table import Table

    table = Table(title=f"zero-shot vs {report['examples']}-shot ICL vs LoraHub on {report['data']}")
    for col in ("method", "accuracy %", "input tokens / example", "examples / s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for arm, m in report["arms"].items():
        eps = m.get("examples_per_second")
        table.add_row(arm, f"{m['accuracy']:.2f}", f"{m['input_tokens_per_example']:.1f}",
                      f"{eps:.1f}" if eps else "-")
    return table
