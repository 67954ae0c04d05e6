"""``lorahub-ray hub add|list|validate|build``: the module hub catalogue, and a hub trained on task sources
(reasoning-gym generators by default)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from lorahub_ray.cli.app import DeviceOpt, app, console, fail_cleanly, quiet_libraries, results_console


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
@fail_cleanly
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
    from lorahub_ray.io import catalogue as hub

    rows = hub.add(catalogue, uris, task=task, replace=replace)
    console.print(_hub_table(rows, f"added to {catalogue}"))


@hub_app.command("list")
@fail_cleanly
def hub_list(
    catalogue: CatalogueArg,
    filter: FilterOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON Lines on stdout instead of a table.")] = False,
):
    """List the modules of a catalogue."""
    from lorahub_ray.io import catalogue as hub

    rows = hub.select(hub.read_catalogue(catalogue), filter or [])
    if as_json:
        for r in rows:
            typer.echo(json.dumps({**r, "created": r["created"].isoformat()}))
    else:
        results_console().print(_hub_table(rows, f"{catalogue}: {len(rows)} module(s)"))


@hub_app.command("validate")
@fail_cleanly
def hub_validate(
    catalogue: CatalogueArg,
    base_model: Annotated[Optional[str], typer.Option("--base-model", "-m", help="Also check that each module's tensors fit this model's layers.")] = None,
    filter: FilterOpt = None,
):
    """Check every module of a catalogue: files, sha256, rank/targets/base model as recorded, and
    (with --base-model) fit with a base model. Exit 1 if any module fails, naming each."""
    from lorahub_ray.io import catalogue as hub

    rows, problems = hub.validate(catalogue, base_model=base_model, filters=filter or [])
    for problem in problems:
        console.print(f"[bold red]{problem.id}:[/] {problem.message}", highlight=False, soft_wrap=True)
    bad = len({p.id for p in problems})
    typer.echo(f"{len(rows) - bad} of {len(rows)} module(s) valid")
    if problems:
        raise typer.Exit(1)


@hub_app.command("build")
@fail_cleanly
def hub_build(
    model: Annotated[str, typer.Option("--model", "-m", help="Base model, seq2seq or causal LM: Hub id, local directory, s3:// URI or .gguf file.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Hub folder: modules/<task>/, catalogue.parquet and build.json; rerun with the same settings to resume.")],
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated task sources, one module each: reasoning-gym:NAME or reasoning-gym:NAME?KEY=VALUE&... (any generator and config) or bigbench:TASK or bigbench:TASK/SUBTASK. Default: the 25 reasoning-gym generators of the upstream hub, none of whose skills is a BBH task's; BBH itself (bbh:, and BIG-bench's sources of BBH tasks) is refused.")] = None,
    steps: Annotated[int, typer.Option(help="Training steps per module.")] = 100,
    rank: Annotated[int, typer.Option(help="LoRA rank r.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of every module's training.")] = 0,
    split_seed: Annotated[int, typer.Option(help="Seed of each task's train/held-out split.")] = 0,
    train_size: Annotated[int, typer.Option(help="At most this many training examples per task.")] = 1000,
    test_size: Annotated[int, typer.Option(help="Held-out examples per task on which each module is scored.")] = 100,
    template: Annotated[str, typer.Option(help="'plain' or 'chat' (use the same in search and evaluation).")] = "plain",
    device: DeviceOpt = None,
):
    """Train one LoRA module per task (a reasoning-gym generator by default) into a hub, each scored on its own
    held-out split.

    Example:

        lorahub-ray hub build -m SmolLM2-135M-Instruct.Q4_1.gguf -o hubs/smollm2 \\
            --template chat
    """
    from rich.table import Table

    from lorahub_ray.evaluation.hub_build import UPSTREAM, build_hub

    quiet_libraries()
    entries = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else list(UPSTREAM)
    manifest = build_hub(model, output, tasks=entries, steps=steps, rank=rank, lr=lr, batch_size=batch_size, seed=seed,
                         split_seed=split_seed, train_size=train_size, test_size=test_size, template=template,
                         device=device)
    view = Table(title=f"{output}: held-out exact match % of each module on its own task")
    for column in ("module", "train", "test", "seconds", "loss", "base %", "module %"):
        view.add_column(column, justify="left" if column == "module" else "right")
    for name, m in manifest["modules"].items():
        view.add_row(name, str(m["train_examples"]), str(m["test_examples"]), f"{m['train_seconds']:.0f}",
                     f"{m['loss_first']:.2f} -> {m['loss_last']:.2f}", f"{m['base_accuracy']:.0f}",
                     f"{m['module_accuracy']:.0f}")
    results_console().print(view)
    console.print(f"{len(manifest['modules'])} module(s) in {output}/catalogue.parquet; {manifest['seconds']:.0f} s "
                  f"in all", highlight=False)
