"""``lorahub-ray search``: LoraHub learning, in this process or on Ray (a portfolio of restarts)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lorahub_ray.cli.app import (BudgetOpt, DeviceOpt, InputFieldOpt, OptimizerOpt, OutputFieldOpt, SeedOpt, SplitOpt,
                                 SplitSeedOpt, TemplateOpt, app, console, fail_cleanly, quiet_libraries)
from lorahub_ray.io.sources import with_split


def _expand_modules(modules: list[str]) -> list[str]:
    # `--modules a b c` arrives as one option followed by stray arguments; typer collects them in ctx.args
    return [m for item in modules for m in item.split(",") if m]


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": False})
@fail_cleanly
def search(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Base model, seq2seq or causal LM: a Hugging Face Hub id, a local directory, an s3:// URI or a .gguf file (converted once, cached).")] = None,
    examples: Annotated[Optional[str], typer.Option("--examples", "-e", help="Few-shot examples: JSON Lines, Parquet or CSV with input/output fields, local or s3://.")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Directory or s3:// prefix to write recipe.json, adapter/ (the composed module as a PEFT LoRA adapter: PeftModel.from_pretrained(base, OUTPUT/adapter)) and history.parquet (on S3, recipe.json is uploaded last).")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="Also write OUTPUT/model/: the base model with the adapter merged in (a full model, loadable with from_pretrained; as large as the base).")] = False,
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
    template: TemplateOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Run on Ray with this many evaluator actors (each holds the model once). Without it (and without --restarts/--address/--resume) the search runs in this process.", rich_help_panel="Ray")] = None,
    restarts: Annotated[Optional[int], typer.Option(help="Restarts of the portfolio (default: --workers): restart 0 is the one-process search, the others permute the module order and use seeds seed+1, ...; each is a Ray Tune trial and the lowest objective wins.", rich_help_panel="Ray")] = None,
    modules_per_restart: Annotated[Optional[int], typer.Option(help="Each restart searches a random subset of this many modules (the paper: 20).", rich_help_panel="Ray")] = None,
    portfolio: Annotated[Optional[str], typer.Option(help="Optimizers for restarts 1, 2, ... (cycled), e.g. Cobyla,CMA,OnePlusOne; restart 0 runs --optimizer.", rich_help_panel="Ray")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: 'auto', host:port or ray://host:10001 (default: $RAY_ADDRESS, else a private local Ray).", rich_help_panel="Ray")] = None,
    cpus_per_worker: Annotated[Optional[float], typer.Option(help="CPUs per evaluator actor (default: an equal share of the cluster, at most 1).", rich_help_panel="Ray")] = None,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per evaluator actor; fractions such as 0.25 let actors share a GPU.", rich_help_panel="Ray")] = 0.0,
    scheduler: Annotated[Optional[str], typer.Option(help="Stop restarts early with a Tune scheduler: 'halving' (deterministic synchronous halving: at budget/4, budget/2, ... evaluations the worse half stops), 'asha' or 'median' (Tune's; their decisions depend on timing). Restart 0 is never stopped. Default: all run to the budget.", rich_help_panel="Ray")] = None,
    searcher: Annotated[Optional[str], typer.Option(help="Any Tune search algorithm instead of the portfolio: 'optuna', 'hyperopt', 'nevergrad' or 'random'; a trial per candidate weight vector, --budget trials, --workers at a time (the searcher's package is an optional extra).", rich_help_panel="Ray")] = None,
    callback: Annotated[Optional[list[str]], typer.Option("--callback", help="Tune tracking callback (repeatable): 'tensorboard', 'mlflow' or 'wandb'; needs its package.", rich_help_panel="Ray")] = None,
    max_failures: Annotated[int, typer.Option(help="Restarts of a failed trial, from its last checkpoint (Tune's FailureConfig).", rich_help_panel="Ray")] = 2,
    asks: Annotated[Optional[int], typer.Option(min=1, help="Candidates asked at once per search (nevergrad's num_workers) and evaluated together, sharing forward passes; default 1. More asks trade quality for time (NGOpt then picks another algorithm): a warning says so.")] = None,
    storage: Annotated[Optional[str], typer.Option(help="Where the run's state and its Tune experiment live (default: OUTPUT.search; s3:// works).", rich_help_panel="Ray")] = None,
    select: Annotated[str, typer.Option(help="'reference': keep the search's lowest few-shot objective (the reference). 'cv': choose among the base model, each single module and searches (from 0 and warm-started at the best single modules) by cross-validation over the examples (leave-one-out up to 5, else 5-fold), then refit the winner on all examples. With --workers/--address the folds run at once on Ray actors (same result).")] = "reference",
    score: Annotated[str, typer.Option(help="With --select cv: 'loss' (held-out loss) or 'generate' (exact match of greedy generations on the held-out examples).")] = "loss",
    select_l1: Annotated[Optional[list[float]], typer.Option("--select-l1", help="With --select cv: also try these stronger L1 strengths (alpha in alpha*mean|w|; repeatable) as candidates.")] = None,
    select_rule: Annotated[Optional[str], typer.Option("--select-rule", help="With --select cv and the loss: 'paired' (the default: the reference search, unless a candidate's held-out loss beats it fold by fold by more than one standard error of the differences), 'one-se' (the simplest candidate, base < single module < search, within one standard error of the lowest mean held-out loss; better where the hub holds the task's own skill) or 'min' (the lowest mean held-out loss).")] = None,
    resume: Annotated[Optional[str], typer.Option(help="Resume an interrupted Ray search (Ctrl-C, a lost driver): its --output directory; everything else is read from the saved run, and Tune restores its experiment.", rich_help_panel="Ray")] = None,
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="Many tasks in one run (the paper's protocol): a folder or s3:// prefix of few-shot files, one per task (the BBH layout). The base model and hub load once; writes OUTPUT/<task>/ (named by the file's stem) and OUTPUT/summary.json. With --restarts S --modules-per-restart K, in this process: S sequential restarts per task (seeds seed..seed+S-1, random K-subsets), the lowest objective wins. With --workers/--address: on Ray, one set of evaluator actors for all tasks, each task a portfolio of S restarts (default --workers), one Ray Tune trial each (the experiment OUTPUT.search/<task>).", rich_help_panel="Protocol")] = None,
    preselect: Annotated[Optional[int], typer.Option(help="Score every module alone on the few-shot examples (weight 1, its loss) and search the k best, starting at weight 1 on the best of them (not at 0); with --modules-per-restart each restart draws from them and starts at the best of its own. The scores go into recipe.json. On Ray the screening runs on the evaluator actors.", rich_help_panel="Protocol")] = None,
    split: SplitOpt = None,
    split_seed: SplitSeedOpt = None,
):
    """Find module weights on a few examples (LoraHub learning) and save the composed module as a PEFT
    adapter (OUTPUT/adapter/), its recipe and, with --merge, the merged model (OUTPUT/model/).

    Example:

        lorahub-ray search --model google/flan-t5-large --modules hub/ \\
            --examples fewshot.jsonl --output runs/task

    On Ray (a local one, or a cluster with --address), a portfolio of 5 restarts over 2 model-holding actors:

        lorahub-ray search -m google/flan-t5-large --modules hub/ \\
            -e fewshot.jsonl -o runs/task --workers 2 --restarts 5
    """
    quiet_libraries()
    from lorahub_ray.api import lorahub_learning
    from lorahub_ray.core.selection import SelectionConfig
    from lorahub_ray.errors import LoraHubError

    examples = with_split(examples, split, split_seed)
    all_modules = _expand_modules(list(modules or []) + list(ctx.args))
    if tasks is not None:
        on_ray = any(v is not None for v in (workers, address, portfolio))
        _check_protocol(examples, on_ray, resume, scheduler, storage, asks, searcher)
        examples = None
    if hub is not None:
        all_modules = _hub_modules(hub, filter or [], all_modules, examples, input_field, output_field,
                                   output if tasks is None else None)
    elif filter:
        raise LoraHubError("--filter selects modules of a hub catalogue: give --hub CATALOGUE too")
    elif not all_modules and resume is None:
        raise LoraHubError("no modules: give --modules or --hub")
    if tasks is not None:
        ray_options = dict(workers=workers or 2, address=address, asks=asks, cpus_per_worker=cpus_per_worker,
                           gpus_per_worker=gpus_per_worker,
                           portfolio=_expand_modules([portfolio]) if portfolio else None) if on_ray else {}
        _run_tasks(model, all_modules, tasks, output, budget=budget, optimizer=optimizer, seed=seed,
                   restarts=restarts if on_ray else restarts or 1, modules_per_restart=modules_per_restart,
                   preselect=preselect, loss=loss, batch_size=batch_size, input_field=input_field,
                   output_field=output_field, device=device, template=template or "plain", merge=merge,
                   **ray_options)
        return
    chosen = {k: v for k, v in (("l1", tuple(select_l1 or ())), ("rule", select_rule)) if v}  # SelectionConfig's
    map_folds = None
    if select != "reference":
        search_only = {"--restarts": restarts, "--modules-per-restart": modules_per_restart,
                       "--portfolio": portfolio, "--resume": resume, "--scheduler": scheduler, "--storage": storage,
                       "--searcher": searcher, "--callback": callback}
        given = [name for name, value in search_only.items() if value is not None]
        if given:
            raise LoraHubError(f"--select cv does not take {', '.join(given)} (the Ray search's options); "
                               "--workers and --address run its folds on Ray")
        if workers is not None or address is not None:
            from lorahub_ray.cluster.folds import RayFolds

            map_folds = RayFolds(workers or 2, address=address, cpus_per_worker=cpus_per_worker,
                                 gpus_per_worker=gpus_per_worker)
    elif any(v is not None for v in (workers, restarts, modules_per_restart, portfolio, address, resume, scheduler,
                                     storage, searcher, callback)):
        from lorahub_ray.cluster.ray_search import SearchFailed, SearchInterrupted, lorahub_learning_ray

        try:
            result = lorahub_learning_ray(
            model, all_modules, examples, output=output, workers=workers or 2, restarts=restarts,
            modules_per_restart=modules_per_restart, portfolio=_expand_modules([portfolio]) if portfolio else None,
            budget=budget, optimizer=optimizer, seed=seed, loss=loss,
            batch_size=batch_size, input_field=input_field, output_field=output_field, address=address,
            cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker, device=device, scheduler=scheduler,
            searcher=searcher, callbacks=list(callback or ()), max_failures=max_failures, asks=asks,
            storage_path=storage, resume=resume, template=template or "plain", preselect=preselect,
            merge=merge)
        except SearchInterrupted as exc:
            console.print(f"[bold yellow]interrupted:[/] {exc}", highlight=False)
            raise typer.Exit(130) from None
        except SearchFailed as exc:
            console.print(f"[bold red]search failed:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
        _print_weights(result.recipe)
        how = (f"the best of {len(result.best.history)} {result.recipe.optimizer} trials" if result.recipe.search["searcher"]
               else f"restart {result.best.restart} of {len(result.restarts)}")
        console.print(f"objective {result.recipe.objective:.4f} ({result.recipe.algorithm}, {how}) in "
                      f"{result.seconds:.1f} s; {_written(result.output, merge, 'search.png')}; Tune experiment "
                      f"{result.experiment}", highlight=False)
        return
    if model is None or examples is None or output is None:
        raise LoraHubError("--model, --examples and --output are required (or --resume DIR with --workers)")
    result = lorahub_learning(model, all_modules, examples, output=output, budget=budget, optimizer=optimizer,
                              seed=seed, loss=loss, batch_size=batch_size, input_field=input_field,
                              output_field=output_field, device=device, asks=asks or 1, template=template or "plain",
                              preselect=preselect, select=select, score=score,
                              selection=SelectionConfig(**chosen) if chosen else None,
                              map_folds=map_folds, merge=merge)
    _print_weights(result.recipe)
    if "selection" in result.recipe.search:
        console.print(f"selected {result.recipe.search['selection']['reason']}", highlight=False)
    console.print(f"objective {result.recipe.objective:.4f} ({result.recipe.algorithm}); "
                  f"{_written(output, merge)}", highlight=False)


def _written(output, merge: bool, *more: str) -> str:
    files = ["recipe.json", "adapter/", *(["model/"] if merge else []), "history.parquet", *more]
    return f"wrote {str(output).rstrip('/')}/: {', '.join(files)}"


def _check_protocol(examples, on_ray: bool, resume, scheduler, storage, asks, searcher) -> None:
    from lorahub_ray.errors import LoraHubError

    if examples is not None:
        raise LoraHubError("give either --examples (one task) or --tasks (one file per task), not both")
    refused = {"--resume": resume, "--scheduler": scheduler, "--storage": storage, "--searcher": searcher}
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise LoraHubError(f"--tasks does not take {', '.join(given)} (one search's options); leave them out")
    if asks is not None and not on_ray:
        raise LoraHubError("--asks with --tasks runs on Ray: give --workers N too")


def _run_tasks(model, modules, tasks, output, **options) -> None:
    """--tasks: every task's restarts, then the summary table; exit 1 when a task failed."""
    from rich.table import Table

    from lorahub_ray.api import lorahub_tasks
    from lorahub_ray.errors import LoraHubError

    if model is None or output is None:
        raise LoraHubError("--model and --output are required with --tasks")
    summary = lorahub_tasks(model, modules, tasks, output=output, **options)
    table = Table(title=f"{len(summary['tasks'])} task(s), {summary['restarts']} restart(s) each"
                  + (f" on {options['workers']} Ray worker(s)" if options.get("workers") else ""))
    for column in ("task", "status", "objective", "restart", "seconds", "error"):
        table.add_column(column, justify="right" if column in ("objective", "restart", "seconds") else "left")
    for row in summary["tasks"]:
        table.add_row(row["task"], row["status"], "" if row["objective"] is None else f"{row['objective']:.4f}",
                      "" if row["restart"] is None else str(row["restart"]), f"{row['seconds']:.1f}",
                      row["error"] or "")
    console.print(table)
    failed = [row["task"] for row in summary["tasks"] if row["status"] != "ok"]
    console.print(f"wrote {output}/<task>/ and {output}/summary.json"
                  + (f"; [bold red]{len(failed)} failed:[/] {', '.join(failed)}" if failed else ""), highlight=False)
    if failed:
        raise typer.Exit(1)


def _hub_modules(hub: str, filters: list[str], extra: list[str], examples: str, input_field: str,
                 output_field: str, output: str):
    """Modules drawn from a hub catalogue, loaded with their recorded sha256 (a changed module is an
    error naming its id). The cheap checks (examples, output) run first, as in lorahub_learning."""
    from lorahub_ray.io import catalogue as hub_lib
    from lorahub_ray.io import storage
    from lorahub_ray.io.examples import as_examples
    from lorahub_ray.errors import LoraHubError
    from lorahub_ray.core.recipe import RECIPE_FILE

    if extra:
        raise LoraHubError("give either --modules or --hub, not both")
    if examples is not None:  # with --tasks the task files are checked by the protocol
        as_examples(examples, input_field=input_field, output_field=output_field)
    if output is not None:
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
