"""``lorahub-ray evaluate`` and ``lorahub-ray compare``: accuracy on test sets, in this process or on Ray Data."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lorahub_ray.cli.app import (DeviceOpt, InputFieldOpt, OutputFieldOpt, SplitOpt, SplitSeedOpt, TemplateOpt, app,
                                 console, fail_cleanly, quiet_libraries, results_console)
from lorahub_ray.io.sources import with_split


WorkersOpt = Annotated[int, typer.Option("--workers", "-w", help="Shard generation across this many Ray Data actor workers (one model per actor); 0: in this process. Results are the same either way.")]
GpusPerWorkerOpt = Annotated[float, typer.Option(help="GPUs per worker; fractions such as 0.5 put several workers on one GPU.")]
CpusPerWorkerOpt = Annotated[Optional[float], typer.Option(help="CPUs per worker (default: 1, leaving one CPU of the cluster free for reading).")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray).")]
GenerateBatchOpt = Annotated[int, typer.Option("--batch-size", help="Generation batch size.")]
MaxNewTokensOpt = Annotated[int, typer.Option(help="Longest generated answer, in tokens.")]


@app.command()
@fail_cleanly
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="A lorahub-ray output directory (its model/ if written with --merge, else the base model with its adapter/ merged in at load), or any seq2seq or causal LM: Hub id, .gguf file, local directory or s3:// URI.")],
    data: Annotated[str, typer.Option("--data", "-d", help="Test set: a JSON Lines, Parquet or CSV file with input/output fields, or a folder or prefix of such files, one per task; local or s3://.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Directory or s3:// prefix to write predictions.parquet and metrics.json (accuracy in percent, per task and macro average).")] = None,
    workers: WorkersOpt = 0,
    gpus_per_worker: GpusPerWorkerOpt = 0.0,
    cpus_per_worker: CpusPerWorkerOpt = None,
    address: AddressOpt = None,
    batch_size: GenerateBatchOpt = 32,
    max_new_tokens: MaxNewTokensOpt = 64,
    input_field: InputFieldOpt = "input",
    output_field: OutputFieldOpt = "output",
    device: DeviceOpt = None,
    split: SplitOpt = None,
    split_seed: SplitSeedOpt = None,
    template: TemplateOpt = None,
):
    """Exact-match accuracy (strip, lower-case, drop '.', as the reference) of a model on a test set,
    in this process or sharded across Ray Data workers.

    Examples:

        lorahub-ray evaluate --model runs/task --data test.jsonl \\
            --output runs/task/eval

        lorahub-ray evaluate --model runs/task --data s3://bucket/bbh/ \\
            --workers 4 --gpus-per-worker 0.5 -o eval
    """
    quiet_libraries()
    from lorahub_ray.api import evaluate_data

    data = with_split(data, split, split_seed)

    result = evaluate_data(model, data, output=output, workers=workers, gpus_per_worker=gpus_per_worker, address=address,
                           cpus_per_worker=cpus_per_worker, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           input_field=input_field, output_field=output_field, device=device, template=template)
    m = result.metrics
    if len(m["tasks"]) > 1:
        from rich.table import Table

        table = Table(title="accuracy per task")
        table.add_column("task")
        table.add_column("examples", justify="right")
        table.add_column("accuracy %", justify="right")
        for task, t in m["tasks"].items():
            table.add_row(task, str(t["examples"]), f"{t['accuracy']:.2f}")
        console.print(table)
        typer.echo(f"macro accuracy {m['macro_accuracy']:.2f}% over {len(m['tasks'])} tasks")
    typer.echo(f"accuracy {m['accuracy']:.2f}% on {m['examples']} examples "
               f"({m['examples_per_second']:.1f} examples/s, {m['input_tokens_per_example']:.1f} input tokens/example)")
    if output is not None:
        console.print(f"wrote {output}/predictions.parquet and {output}/metrics.json")


@app.command()
@fail_cleanly
def compare(
    model: Annotated[str, typer.Option("--model", "-m", help="The base model the recipe was made from: Hub id, local directory or s3:// URI.")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="A lorahub-ray output directory (recipe.json with adapter/ or model/).")],
    examples: Annotated[str, typer.Option("--examples", "-e", help="The few-shot examples (prepended to every input for the in-context baseline).")],
    data: Annotated[str, typer.Option("--data", "-d", help="Test set: file, or folder/prefix of one file per task; local or s3://.")],
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Directory or s3:// prefix to write compare.json, compare.png and each method's predictions and metrics.")] = None,
    workers: WorkersOpt = 0,
    gpus_per_worker: GpusPerWorkerOpt = 0.0,
    cpus_per_worker: CpusPerWorkerOpt = None,
    address: AddressOpt = None,
    batch_size: GenerateBatchOpt = 32,
    max_new_tokens: MaxNewTokensOpt = 64,
    input_field: InputFieldOpt = "input",
    output_field: OutputFieldOpt = "output",
    device: DeviceOpt = None,
    split_seed: SplitSeedOpt = None,
    template: TemplateOpt = None,
):
    """The paper's comparison on your task: zero-shot, few-shot in-context learning and LoraHub on the
    same test set, with accuracy, input tokens per example and examples per second.

    Example:

        lorahub-ray compare --model google/flan-t5-large --recipe runs/task \\
            --examples fewshot.jsonl --data test.jsonl -o runs/task/compare
    """
    quiet_libraries()
    from lorahub_ray.api import compare as run_compare
    from lorahub_ray.evaluation.compare import format_table

    examples, data = with_split(examples, None, split_seed), with_split(data, None, split_seed)  # fewshot / test

    report = run_compare(model, recipe, examples, data, output=output, workers=workers, address=address,
                         gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, input_field=input_field, output_field=output_field,
                         device=device, template=template)
    results_console().print(format_table(report))
    if output is not None:
        console.print(f"wrote {output}/compare.json and {output}/compare.png")
