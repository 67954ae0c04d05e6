"""``lorahub-ray hub add|list|validate``: the module hub catalogue."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

from lorahub_ray.cli.app import (app, console, fail_cleanly)


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
        Console().print(_hub_table(rows, f"{catalogue}: {len(rows)} module(s)"))


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
