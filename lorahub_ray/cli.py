"""The ``lorahub-ray`` command line: a thin layer over :mod:`lorahub_ray.api`."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="lorahub-ray",
    help="LoraHub on Ray: adapt a seq2seq model to a new task from a few examples by composing LoRA modules "
    "with a gradient-free search, then evaluate, compare and serve the result.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(stderr=True)


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """lorahub-ray's own warnings as one line on the console, others as Python shows them."""
    from .errors import LoraHubWarning

    if issubclass(category, LoraHubWarning):
        console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    else:
        _default(message, category, filename, lineno, file, line)


warnings.showwarning = _show_warning

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Base seq2seq model: a Hugging Face Hub id, a local directory or an s3:// URI.")]
ModulesOpt = Annotated[list[str], typer.Option("--modules", help="LoRA modules: PEFT adapter directories, folders of them, Hub ids or s3:// prefixes. Repeat the option or list several after it.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the optimizer (the reference's default is 42).")]
BudgetOpt = Annotated[int, typer.Option(help="Number of objective evaluations (the paper uses 40).")]
OptimizerOpt = Annotated[str, typer.Option(help="nevergrad optimizer by name: NGOpt (default, picks an algorithm from dimension and budget), CMA, OnePlusOne, RandomSearch, Cobyla, ...")]
InputFieldOpt = Annotated[str, typer.Option(help="Name of the input column/field in the data files.")]
OutputFieldOpt = Annotated[str, typer.Option(help="Name of the target column/field in the data files.")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")]


def _quiet_libraries() -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _fail_cleanly(fn):
    """Bad input ends in one clear line (exit 2), not a traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .errors import LoraHubError

        try:
            return fn(*args, **kwargs)
        except LoraHubError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)  # one line
            raise typer.Exit(2) from None

    return wrapper


def _expand_modules(modules: list[str]) -> list[str]:
    # `--modules a b c` arrives as one option followed by stray arguments; typer collects them in ctx.args
    return [m for item in modules for m in item.split(",") if m]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@_fail_cleanly
def search(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base seq2seq model: a Hugging Face Hub id, a local directory or an s3:// URI.")] = None,
    examples: Annotated[Optional[str], typer.Option("--examples", "-e", help="Few-shot examples: JSON Lines, Parquet or CSV with input/output fields, local or s3://.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Directory or s3:// prefix to write recipe.json, model/ (merged, loadable with from_pretrained) and history.parquet (on S3, recipe.json is uploaded last).")] = None,
    modules: Annotated[Optional[list[str]], typer.Option("--modules", help="LoRA modules: PEFT adapter directories, folders of them, Hub ids or s3:// prefixes. Repeat the option or list several after it. Or use --hub.")] = None,
    hub: Annotated[Optional[str], typer.Option("--hub", help="Draw the modules from this hub catalogue (Parquet, local or s3://); their sha256 are checked on load.")] = None,
    filter: Annotated[Optional[list[str]], typer.Option("--filter", help="With --hub: keep modules with FIELD=VALUE, FIELD!=VALUE, FIELD~REGEX or FIELD!~REGEX (repeatable, all must hold), e.g. task~^qa.")] = None,
    budget: BudgetOpt = 40,
    optimizer: OptimizerOpt = "NGOpt",
    seed: SeedOpt = 42,
    loss: Annotated[str, typer.Option(help="'reference': the reference's loss (sum of batch-mean CE / number of examples, so it depends on --batch-size); 'mean': mean per-example CE.")] = "reference",
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size of the loss; default: all examples in one batch, as the reference.")] = None,
    input_field: InputFieldOpt = "input",
    output_field: OutputFieldOpt = "output",
    device: DeviceOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Run on Ray with this many evaluator actors (each holds the model once). Without it (and without --restarts/--address/--resume) the search runs in this process.", rich_help_panel="Ray")] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Independent searches (seeds seed, seed+1, ...) run as concurrent Ray Tune trials; the best wins.", rich_help_panel="Ray")] = None,
    modules_per_restart: Annotated[Optional[int], typer.Option(help="Each restart searches a random subset of this many modules (the paper: 20).", rich_help_panel="Ray")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: 'auto', host:port or ray://host:10001 (default: start a local Ray).", rich_help_panel="Ray")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs per evaluator actor (default: an equal share of the cluster, at most 1).", rich_help_panel="Ray")] = None,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per evaluator actor; fractions such as 0.25 let actors share a GPU.", rich_help_panel="Ray")] = 0.0,
    scheduler: Annotated[Optional[str], typer.Option(help="'asha' stops hopeless restarts early; default: run all to the budget.", rich_help_panel="Ray")] = None,
    asks: Annotated[Optional[int], typer.Option(min=1, help="Candidates asked at once per search (nevergrad's num_workers) and evaluated together, sharing forward passes; default 1 in this process, ceil(workers / restarts) on Ray. More asks buy wall time at some cost in quality.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Ray Tune experiment storage (default: OUTPUT.tune; use shared storage such as s3:// on a multi-node cluster).", rich_help_panel="Ray")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Resume an interrupted Ray search: its --output directory (everything else is read from the saved run).", rich_help_panel="Ray")] = None,
):
    """Find module weights on a few examples (LoraHub learning) and save the merged model and its recipe.

    Example:

        lorahub-ray search --model google/flan-t5-large --modules hub/ --examples fewshot.jsonl --output runs/task

    On Ray (a local one, or a cluster with --address), 5 restarts over 2 model-holding actors:

        lorahub-ray search -m google/flan-t5-large --modules hub/ -e fewshot.jsonl -o runs/task --workers 2 --restarts 5
    """
    _quiet_libraries()
    from .api import lorahub_learning
    from .errors import LoraHubError

    all_modules = _expand_modules(list(modules or []) + list(ctx.args))
    if hub is not None:
        all_modules = _hub_modules(hub, filter or [], all_modules, examples, input_field, output_field, output)
    elif filter:
        raise LoraHubError("--filter selects modules of a hub catalogue: give --hub CATALOGUE too")
    elif not all_modules and resume is None:
        raise LoraHubError("no modules: give --modules or --hub")
    if any(v is not None for v in (workers, restarts, modules_per_restart, address, resume, scheduler, storage)):
        from .distributed import SearchFailed, SearchInterrupted, lorahub_learning_ray

        try:
            result = lorahub_learning_ray(
            model, all_modules, examples, output=output, workers=workers or 2, restarts=restarts or 1,
            modules_per_restart=modules_per_restart, budget=budget, optimizer=optimizer, seed=seed, loss=loss,
            batch_size=batch_size, input_field=input_field, output_field=output_field, address=address,
            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, device=device, scheduler=scheduler,
            asks=asks, storage_path=storage, resume=resume)
        except SearchInterrupted as exc:
            console.print(f"[bold yellow]interrupted:[/] {exc}", highlight=False)
            raise typer.Exit(130) from None
        except SearchFailed as exc:
            console.print(f"[bold red]search failed:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        _print_weights(result.recipe)
        console.print(f"objective {result.recipe.objective:.4f} ({result.recipe.algorithm}, restart "
                      f"{result.best.restart} of {len(result.trials)}) in {result.seconds:.1f} s; wrote "
                      f"{result.output}/recipe.json, model/, history.parquet and search.png")
        return
    if model is None or examples is None or output is None:
        raise LoraHubError("--model, --examples and --output are required (or --resume DIR with --workers)")
    result = lorahub_learning(model, all_modules, examples, output=output, budget=budget, optimizer=optimizer,
                              seed=seed, loss=loss, batch_size=batch_size, input_field=input_field,
                              output_field=output_field, device=device, asks=asks or 1)
    _print_weights(result.recipe)
    console.print(f"objective {result.recipe.objective:.4f} ({result.recipe.algorithm}); wrote {output}/recipe.json and {output}/model/")


def _hub_modules(hub: str, filters: list[str], extra: list[str], examples: str, input_field: str,
                 output_field: str, output: str):
    """Modules drawn from a hub catalogue, loaded with their recorded sha256 (a changed module is an
    error naming its id). The cheap checks (examples, output) run first, as in lorahub_learning."""
    from . import hub as hub_lib
    from . import storage
    from .data import as_examples
    from .errors import LoraHubError
    from .recipe import RECIPE_FILE

    if extra:
        raise LoraHubError("give either --modules or --hub, not both")
    as_examples(examples, input_field=input_field, output_field=output_field)
    storage.check_output(output, marker=RECIPE_FILE)
    modules = hub_lib.load_selected(hub, filters)  # also checks that they fit together
    console.print(f"{len(modules)} module(s) from {hub}: {', '.join(m.name for m in modules)}", highlight=False)
    return modules


def _print_weights(recipe, top: int = 10) -> None:
    from rich.table import Table

    table = Table(title="module weights", show_header=True)
    table.add_column("module")
    table.add_column("weight", justify="right")
    for name, weight in sorted(recipe.module_weights.items(), key=lambda kv: -abs(kv[1]))[:top]:
        table.add_row(name, f"{weight:+.3f}")
    console.print(table)


WorkersOpt = Annotated[int, typer.Option("--workers", "-w", help="Shard generation across this many Ray Data actor workers (one model per actor); 0: in this process. Results are the same either way.")]
GpusPerWorkerOpt = Annotated[float, typer.Option(help="GPUs per worker; fractions such as 0.5 put several workers on one GPU.")]
CpusPerWorkerOpt = Annotated[Optional[float], typer.Option(help="CPUs per worker (default: 1, leaving one CPU of the cluster free for reading).")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: $RAY_ADDRESS, else a private local Ray).")]
GenerateBatchOpt = Annotated[int, typer.Option("--batch-size", help="Generation batch size.")]
MaxNewTokensOpt = Annotated[int, typer.Option(help="Longest generated answer, in tokens.")]


def _connect_ray(workers: int, address: str | None) -> None:
    """With --workers and --address: join that cluster before Ray Data starts (else it starts a local Ray)."""
    if workers > 0 and address:
        from .ray_data import connect

        connect(address)


@app.command()
@_fail_cleanly
def evaluate(
    model: Annotated[str, typer.Option("--model", "-m", help="A lorahub-ray output directory (its model/), or any seq2seq model: Hub id, local directory or s3:// URI.")],
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
):
    """Exact-match accuracy (strip, lower-case, drop '.', as the reference) of a model on a test set,
    in this process or sharded across Ray Data workers.

    Examples:

        lorahub-ray evaluate --model runs/task --data test.jsonl --output runs/task/eval

        lorahub-ray evaluate --model runs/task --data s3://bucket/bbh/ --workers 4 --gpus-per-worker 0.5 -o eval
    """
    _quiet_libraries()
    from .evaluation import evaluate_data

    _connect_ray(workers, address)
    result = evaluate_data(model, data, output=output, workers=workers, gpus_per_worker=gpus_per_worker,
                           cpus_per_worker=cpus_per_worker, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           input_field=input_field, output_field=output_field, device=device)
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
@_fail_cleanly
def compare(
    model: Annotated[str, typer.Option("--model", "-m", help="The base seq2seq model the recipe was made from: Hub id, local directory or s3:// URI.")],
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="A lorahub-ray output directory (recipe.json and model/).")],
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
):
    """The paper's comparison on your task: zero-shot, few-shot in-context learning and LoraHub on the
    same test set, with accuracy, input tokens per example and examples per second.

    Example:

        lorahub-ray compare --model google/flan-t5-large --recipe runs/task --examples fewshot.jsonl --data test.jsonl -o runs/task/compare
    """
    _quiet_libraries()
    from .compare import compare as run_compare
    from .compare import format_table

    _connect_ray(workers, address)
    report = run_compare(model, recipe, examples, data, output=output, workers=workers,
                         gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker, batch_size=batch_size,
                         max_new_tokens=max_new_tokens, input_field=input_field, output_field=output_field,
                         device=device)
    Console().print(format_table(report))
    if output is not None:
        console.print(f"wrote {output}/compare.json and {output}/compare.png")


@app.command()
@_fail_cleanly
def demo(
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where the embedded default hub is built and cached (default: $LORAHUB_RAY_CACHE or ~/.cache/lorahub-ray).")] = None,
    budget: BudgetOpt = 40,
    optimizer: OptimizerOpt = "NGOpt",
    seed: SeedOpt = 42,
    output: Annotated[Optional[Path], typer.Option(help="Also write the results as JSON here.")] = None,
):
    """Run LoraHub on the embedded default: a small byte-level T5 and a hub of LoRA modules trained on
    synthetic text tasks, built on first use (a few minutes) and cached.

    For each unseen task it prints the zero-shot accuracy of the base model, the LoraHub accuracy,
    the top module weights and the time taken.
    """
    _quiet_libraries()
    from .demo import print_report, run_demo

    report = run_demo(cache_dir=cache_dir, budget=budget, optimizer=optimizer, seed=seed)
    print_report(report)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")


@app.command("serve")
@_fail_cleanly
def serve_command(
    recipe: Annotated[list[str], typer.Option("--recipe", "-r", help="A recipe directory to serve (recipe.json, model/), local or s3://; 'ID=DIR' names it (default id: the directory's name). Repeat for several.")],
    host: Annotated[str, typer.Option(help="Address the HTTP proxy listens on (loopback by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    mode: Annotated[str, typer.Option(help="auto (merged for one recipe, composed for several), merged (one merged model per recipe: fastest) or composed (one base model, LoRA switched in place per request group).")] = "auto",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster address (default: connect to a running one if any, else start a local one).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most inputs generated together in one batch.")] = 32,
    batch_wait_timeout_s: Annotated[float, typer.Option(help="How long a batch waits to fill, in seconds.")] = 0.01,
    max_inputs: Annotated[int, typer.Option(help="Most inputs in one request (at most --max-batch-size).")] = 32,
    min_replicas: Annotated[int, typer.Option(help="Fewest model replicas (autoscaling).")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Most model replicas (autoscaling).")] = 2,
    num_cpus: Annotated[float, typer.Option(help="CPUs per model replica.")] = 1.0,
    num_gpus: Annotated[Optional[float], typer.Option(help="GPUs per model replica; fractions share a GPU (default: 0.5 if the cluster has GPUs, else 0).")] = None,
):
    """Serve recipes over HTTP with Ray Serve: POST /generate, GET /recipes, GET /healthz, /docs.

    Example:

        lorahub-ray serve --recipe runs/task --recipe other=runs/task2 --port 8000
    """
    from .serve import parse_args
    from .serving import check_mode, check_recipe_dirs, parse_specs

    # every cheap check before Ray starts
    specs = parse_specs(recipe)
    check_mode(mode)
    check_recipe_dirs(specs)
    args = parse_args({"recipes": [{"id": s.id, "path": s.path} for s in specs], "mode": mode,
                       "max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s,
                       "max_inputs": max_inputs, "min_replicas": min_replicas, "max_replicas": max_replicas,
                       "num_cpus": num_cpus, "num_gpus": num_gpus})
    import signal

    import ray
    from ray import serve as ray_serve

    from .serve import app as build_app

    ray.init(address=address, logging_level="ERROR")
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(build_app(args), name="lorahub", route_prefix="/")
    console.print(f"serving {', '.join(s.id for s in specs)} at http://{host}:{port} (API: /docs); Ctrl-C stops")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()

# --- the module hub ------------------------------------------------------------------------------

hub_app = typer.Typer(help="The module hub: a Parquet catalogue of LoRA modules (local or s3://) with their sha256.",
                      no_args_is_help=True)
app.add_typer(hub_app, name="hub")
CatalogueArg = Annotated[str, typer.Argument(help="The catalogue: a Parquet file, local or s3://.")]
FilterOpt = Annotated[Optional[list[str]], typer.Option("--filter", help="FIELD=VALUE, FIELD!=VALUE, FIELD~REGEX or FIELD!~REGEX (repeatable).")]


def _hub_table(rows, title: str):
    from rich.table import Table

    table = Table(title=title)
    for column in ("id", "task", "base_model", "rank", "target_modules", "size", "sha256", "uri"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["id"], r["task"], r["base_model"], str(r["rank"]), ",".join(r["target_modules"]),
                      str(r["size"]), r["sha256"][:12], r["uri"])
    return table


@hub_app.command("add")
@_fail_cleanly
def hub_add(
    catalogue: CatalogueArg,
    uris: Annotated[list[str], typer.Argument(help="Modules: adapter directories or folders of them, local or s3://.")],
    task: Annotated[Optional[str], typer.Option(help="Task label of these modules (default: each module's id).")] = None,
    replace: Annotated[bool, typer.Option("--replace", help="Update modules whose id is already in the catalogue.")] = False,
):
    """Add modules to a catalogue (created if missing): each is loaded, checked and hashed.

    Example:

        lorahub-ray hub add s3://hub/catalogue.parquet s3://hub/modules/ --task qa
    """
    from . import hub

    rows = hub.add(catalogue, uris, task=task, replace=replace)
    console.print(_hub_table(rows, f"added to {catalogue}"))


@hub_app.command("list")
@_fail_cleanly
def hub_list(
    catalogue: CatalogueArg,
    filter: FilterOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON Lines on stdout instead of a table.")] = False,
):
    """List the modules of a catalogue."""
    from . import hub

    rows = hub.select(hub.read_catalogue(catalogue), filter or [])
    if as_json:
        for r in rows:
            typer.echo(json.dumps({**r, "created": r["created"].isoformat()}))
    else:
        Console().print(_hub_table(rows, f"{catalogue}: {len(rows)} module(s)"))


@hub_app.command("validate")
@_fail_cleanly
def hub_validate(
    catalogue: CatalogueArg,
    base_model: Annotated[Optional[str], typer.Option("--base-model", "-m", help="Also check that each module's tensors fit this model's layers.")] = None,
    filter: FilterOpt = None,
):
    """Check every module of a catalogue: files, sha256, rank/targets/base model as recorded, and
    (with --base-model) fit with a base model. Exit 1 if any module fails, naming each."""
    from . import hub

    rows, problems = hub.validate(catalogue, base_model=base_model, filters=filter or [])
    for problem in problems:
        console.print(f"[bold red]{problem.id}:[/] {problem.message}", highlight=False, soft_wrap=True)
    bad = len({p.id for p in problems})
    typer.echo(f"{len(rows) - bad} of {len(rows)} module(s) valid")
    if problems:
        raise typer.Exit(1)


# --- Ray Jobs ------------------------------------------------------------------------------------


@app.command(context_settings={"ignore_unknown_options": True})
@_fail_cleanly
def submit(
    command: Annotated[Optional[list[str]], typer.Argument(help="After '--': the lorahub-ray command to run, e.g. -- search --model ... --output s3://...")] = None,
    address: Annotated[str, typer.Option("--address", help="The Ray job API, e.g. http://HEAD:8265.", envvar="RAY_ADDRESS")] = "http://127.0.0.1:8265",
    working_dir: Annotated[Optional[str], typer.Option("--working-dir", help="Local directory uploaded as the job's working directory (runtime_env working_dir).")] = None,
    runtime_env_file: Annotated[Optional[str], typer.Option("--runtime-env", help="A runtime_env as a YAML or JSON file (pip, env_vars, ...); --working-dir and --env go on top.")] = None,
    env: Annotated[Optional[list[str]], typer.Option("--env", help="KEY=VALUE for the job's environment, or KEY to forward its value from here (repeatable), e.g. --env AWS_ENDPOINT_URL.")] = None,
    submission_id: Annotated[Optional[str], typer.Option(help="Job id to use (default: one Ray picks).")] = None,
    num_cpus: Annotated[Optional[float], typer.Option(help="CPUs reserved for the job's entrypoint (where the search runs).")] = None,
    num_gpus: Annotated[Optional[float], typer.Option(help="GPUs reserved for the job's entrypoint: puts it on a GPU node.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the job's logs until it ends; exit 0 if it succeeded, 1 if not.")] = False,
    python: Annotated[str, typer.Option(help="The Python, on the cluster, that runs `-m lorahub_ray` (one with lorahub-ray's dependencies).")] = "python",
):
    """Run a lorahub-ray command (search, evaluate, ...) as a Ray job on a cluster and print its id.

    Example:

        lorahub-ray submit --address http://head:8265 --working-dir . --env AWS_ENDPOINT_URL --wait \\
            -- search --model s3://models/flan-t5-large --hub s3://hub/catalogue.parquet --examples s3://data/fewshot.jsonl --output s3://runs/task
    """
    import sys

    from . import jobs

    entry = jobs.entrypoint(command or [], python=python)  # checked before anything is sent
    runtime = jobs.runtime_env(file=runtime_env_file, working_dir=working_dir, env=jobs.parse_env(env or []))
    job_id = jobs.submit(address, command or [], runtime_env=runtime, submission_id=submission_id,
                         entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus, python=python)
    console.print(f"submitted job [bold]{job_id}[/] to {address}: {entry}", highlight=False, soft_wrap=True)
    if runtime:
        console.print(f"runtime_env {jobs.describe(runtime)}", highlight=False, markup=False, soft_wrap=True)
    typer.echo(job_id)
    if not wait:
        console.print(f"follow it with: ray job logs --address {address} --follow {job_id}", highlight=False, soft_wrap=True)
        return
    result = jobs.wait(address, job_id, follow=lambda chunk: (sys.stderr.write(chunk), sys.stderr.flush()))
    console.print(f"job {job_id} {result.status}" + (f": {result.message}" if result.message and not result.ok else ""),
                  highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
