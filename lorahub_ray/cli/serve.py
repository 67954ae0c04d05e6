"""``lorahub-ray serve``: recipes behind a Ray Serve HTTP endpoint."""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from lorahub_ray.cli.app import (app, console, fail_cleanly)
from lorahub_ray.serving.auth import ENV_VAR

# Serve's controller checks that a new HTTP proxy is ready within 5 s, three times, then kills it, and
# `serve.start` fails with ActorDiedError: on a loaded machine a proxy's start (imports, uvicorn) takes longer
# (measured: 3 busy processes on 2 cores). A Ray that `serve` starts gives the proxy these limits instead; a
# value already in the environment, and a cluster started elsewhere (its own environment), keep theirs.
PROXY_CHECK_S = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "30"}


@app.command("serve")
@fail_cleanly
def serve_command(
    recipe: Annotated[list[str], typer.Option("--recipe", "-r", help="A recipe directory to serve (recipe.json with adapter/ or model/), local or s3://; 'ID=DIR' names it (default id: the directory's name). Repeat for several.")],
    host: Annotated[str, typer.Option(help="Address the HTTP proxy listens on (loopback by default; 0.0.0.0 exposes it).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
    mode: Annotated[str, typer.Option(help="auto (merged for one recipe, composed for several), merged (one merged model per recipe: fastest) or composed (one base model, LoRA switched in place per request group).")] = "auto",
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: 'auto', host:port or ray://host:10001 (default: $RAY_ADDRESS, else a private local Ray).")] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most inputs generated together in one batch.")] = 32,
    batch_wait_timeout_s: Annotated[float, typer.Option(help="How long a batch waits to fill, in seconds.")] = 0.01,
    max_inputs: Annotated[int, typer.Option(help="Most inputs in one request (at most --max-batch-size).")] = 32,
    min_replicas: Annotated[int, typer.Option(help="Fewest model replicas (autoscaling).")] = 1,
    max_replicas: Annotated[int, typer.Option(help="Most model replicas (autoscaling).")] = 2,
    num_cpus: Annotated[float, typer.Option(help="CPUs per model replica.")] = 1.0,
    num_gpus: Annotated[Optional[float], typer.Option(help="GPUs per model replica; fractions share a GPU (default: 0.5 if the cluster has GPUs, else 0).")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar=ENV_VAR, show_envvar=True, help="Ask every request but GET /healthz for 'Authorization: Bearer KEY' (OpenAI clients: api_key=KEY). Prefer the environment variable: a command line is visible to other users of the machine.")] = None,
):
    """Serve recipes over HTTP with Ray Serve: the OpenAI API (/v1/models, /v1/completions,
    /v1/chat/completions), POST /generate, GET /recipes, GET /healthz, /docs.

    Example:

        LORAHUB_RAY_API_KEY=secret lorahub-ray serve --recipe runs/task \\
            --recipe other=runs/task2 --port 8000
    """
    from lorahub_ray.cluster.serve_app import parse_args
    from lorahub_ray.serving.auth import AuthConfigError, key_digest
    from lorahub_ray.serving.host import ServeConfigError, check_mode, check_recipe_dirs, parse_specs

    # every cheap check before Ray starts
    if api_key is not None:
        try:
            key_digest(api_key)
        except AuthConfigError as exc:
            raise ServeConfigError(f"--api-key / ${ENV_VAR}: {exc}") from None
    specs = parse_specs(recipe)
    check_mode(mode)
    check_recipe_dirs(specs)
    args = parse_args({"recipes": [{"id": s.id, "path": s.path} for s in specs], "mode": mode,
                       "max_batch_size": max_batch_size, "batch_wait_timeout_s": batch_wait_timeout_s,
                       "max_inputs": max_inputs, "min_replicas": min_replicas, "max_replicas": max_replicas,
                       "num_cpus": num_cpus, "num_gpus": num_gpus})
    if api_key is not None:
        _key_off_the_command_line(api_key)
    import signal

    import ray
    from ray import serve as ray_serve

    from lorahub_ray.cluster.connect import connect
    from lorahub_ray.cluster.serve_app import app as build_app

    for name, seconds in PROXY_CHECK_S.items():
        os.environ.setdefault(name, seconds)  # read by Serve's controller, in a Ray this process starts
    started_ray = connect(address, dashboard=True, log_to_driver=True)  # `serve status` asks the dashboard
    ray_serve.start(http_options={"host": host, "port": port})
    ray_serve.run(build_app(args, api_key=api_key), name="lorahub", route_prefix="/")
    access = "an API key required" if api_key is not None else "no API key: open to anyone who reaches the port"
    console.print(f"serving {', '.join(s.id for s in specs)} at http://{host}:{port} (OpenAI API: /v1, docs: /docs; "
                  f"{access}); Ctrl-C stops")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        ray_serve.shutdown()
        if started_ray:
            ray.shutdown()


def _key_off_the_command_line(api_key: str) -> None:
    """Ray records a driver's command line as its job's entrypoint (``ray list jobs``, the dashboard):
    a key given as ``--api-key KEY`` would be shown there. Before Ray starts, this process runs itself
    again (same pid, same terminal) with the key in $LORAHUB_RAY_API_KEY and not on its command line."""
    import os
    import sys

    kept, given, argv = [], None, sys.argv[1:]
    i = 0
    while i < len(argv):
        if argv[i] == "--api-key" and i + 1 < len(argv):
            given, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith("--api-key="):
            given = argv[i].partition("=")[2]
        else:
            kept.append(argv[i])
        i += 1
    if given != api_key:
        return  # the key came from the environment (or this is no real command line, e.g. a test runner's)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "lorahub_ray", *kept], {**os.environ, ENV_VAR: api_key})
