"""``lorahub-ray bbh``: the paper's BBH table (zero-shot, ICL, LoraHub mean/best, best single module, select cv,
beside the chance and majority baselines) in one command."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from lorahub_ray.cli.app import (BudgetOpt, DeviceOpt, OptimizerOpt, app, console, fail_cleanly, quiet_libraries,
                                 results_console)
from lorahub_ray.cli.evaluate import AddressOpt, GenerateBatchOpt, MaxNewTokensOpt


@app.command()
@fail_cleanly
def bbh(
    model: Annotated[str, typer.Option("--model", "-m", help="The base model, seq2seq or causal LM: Hub id, local directory, s3:// URI or .gguf file.")],
    hub: Annotated[str, typer.Option("--hub", help="The LoRA modules: a folder of adapters (or any module URI), or a hub catalogue (.parquet).")],
    output: Annotated[str, typer.Option("--output", "-o", help="Directory for table.json, table.png, bbh.json and <TASK>/<METHOD>/predictions.parquet; rerun with the same settings to resume.")],
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated BBH task names (the authors' release, read from $LORAHUB_RAY_BBH or downloaded once), task sources (bbh:TASK, reasoning-gym:NAME or reasoning-gym:NAME?KEY=VALUE&..., bigbench:TASK or bigbench:TASK/SUBTASK, a task.json or a task folder) or suites: 'bbh' (the default: all 27 BBH tasks), 'transfer' (reasoning-gym neighbours of the tasks 'hub build' trains on, held out of it) and 'bbh-bigbench' (24 BBH tasks rebuilt from BIG-bench's sources).")] = None,
    seeds: Annotated[int, typer.Option(help="LoraHub runs per task (seeds 0..N-1); the table reports their mean and best.")] = 5,
    modules_per_run: Annotated[int, typer.Option(help="Each run searches a random subset of this many hub modules, drawn with its seed (the paper: 20).")] = 20,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Evaluate on this many Ray Data workers and run select_cv's folds on this many Ray actors (0: all in this process; the LoraHub searches run in this process either way).")] = 0,
    address: AddressOpt = None,
    shots: Annotated[int, typer.Option(help="Few-shot examples per task (the paper: 5).")] = 5,
    split_seed: Annotated[Optional[int], typer.Option(help="Seed of the few-shot/test split (and of BIG-bench's option shuffle); default: each source's own, 42 for BBH (the paper's draw), 0 otherwise.")] = None,
    test_size: Annotated[int, typer.Option(help="Test examples per task, at most 250 (BBH's size).")] = 250,
    template: Annotated[str, typer.Option(help="'plain' or 'chat' (the tokenizer's chat template, for instruct models), for every prompt and search.")] = "plain",
    budget: BudgetOpt = 40,
    optimizer: OptimizerOpt = "NGOpt",
    batch_size: GenerateBatchOpt = 32,
    max_new_tokens: MaxNewTokensOpt = 64,
    device: DeviceOpt = None,
):
    """The paper's table on BIG-Bench Hard (the authors' release) or other task sources: zero-shot, 5-shot ICL, LoraHub
    (mean and best over --seeds runs of --modules-per-run modules), the best single module and
    --select cv, beside the chance and majority baselines, with accuracy and its 95% interval, option
    log-likelihood accuracy on multiple-choice tasks, input tokens per example and seconds per cell,
    and macro averages.

    Example:

        lorahub-ray bbh --model google/flan-t5-large --hub hub/ --output runs/bbh \\
            --tasks date_understanding,navigate
        lorahub-ray bbh --model SmolLM2-135M-Instruct.Q4_1.gguf --hub hubs/smollm2 \\
            --template chat --tasks transfer
    """
    quiet_libraries()
    from lorahub_ray.api import bbh_table  # torch and transformers load with the command, not with the CLI
    from lorahub_ray.evaluation.bbh import BASELINES, METHODS

    entries = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
    table = bbh_table(model, hub, output, tasks=entries, seeds=seeds, modules_per_run=modules_per_run, shots=shots,
                      split_seed=split_seed, test_size=test_size, template=template, budget=budget, optimizer=optimizer, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, device=device, workers=workers, address=address)

    view = Table(title=f"exact match % ±95% interval [option log-likelihood %] (input tokens per example) on {model}")
    view.add_column("task")
    for m in BASELINES + METHODS:
        view.add_column(m, justify="right")

    def show(cell: dict | None, tokens: bool) -> str:
        if cell is None:
            return "-"
        text = f"{cell['accuracy']:.1f}"
        if "ci95" in cell:
            text += f" ±{(cell['ci95'][1] - cell['ci95'][0]) / 2:.0f}"
        if "option_accuracy" in cell:
            text += f" [{cell['option_accuracy']:.0f}]"
        return text + (f" ({cell['tokens_per_example']:.0f})" if tokens else "")

    for name, cells in list(table["tasks"].items()) + [("macro", table["macro"])]:
        view.add_row(name, *(show(cells.get(m), m in METHODS) for m in BASELINES + METHODS))
    results_console().print(view)
    console.print(f"wrote {output}/table.json, {output}/table.png and per-task predictions")
