"""``lorahub-ray submit``: a lorahub-ray command as a Ray job on a cluster."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from lorahub_ray.cli.app import (app, console, fail_cleanly)


# --- Ray Jobs ------------------------------------------------------------------------------------


def app_commands() -> set[str]:
    """The commands (and command groups) of the ``lorahub-ray`` app that a job may run: all but submit."""
    return set(typer.main.get_command(app).commands) - {"submit"}


@app.command(context_settings={"ignore_unknown_options": True})
@fail_cleanly
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

        lorahub-ray submit --address http://head:8265 --working-dir . \\
            --env AWS_ENDPOINT_URL --wait -- \\
            search --model s3://models/flan-t5-large \\
            --hub s3://hub/catalogue.parquet --examples s3://data/fewshot.jsonl \\
            --output s3://runs/task
    """
    import sys

    from lorahub_ray.cluster import jobs

    commands = app_commands()
    entry = jobs.entrypoint(command or [], python=python, commands=commands)  # checked before anything is sent
    runtime = jobs.runtime_env(file=runtime_env_file, working_dir=working_dir, env=jobs.parse_env(env or []))
    job_id = jobs.submit(address, command or [], commands=commands, runtime_env=runtime, submission_id=submission_id,
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
