"""Ray Jobs: run a ``lorahub-ray`` command on a Ray cluster, a thin layer over ``JobSubmissionClient``.

>>> job_id = submit("http://head:8265", ["search", "--model", "s3://...", ..., "--output", "s3://runs/x"],
...                 working_dir=".", env={"AWS_ENDPOINT_URL": None})  # None: forward the local value
>>> wait("http://head:8265", job_id, follow=print).status
'SUCCEEDED'
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lorahub_ray.cluster.connect import check_dashboard, token_auth
from lorahub_ray.errors import LoraHubError

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(LoraHubError):
    """A job that could not be submitted, or bad submission options."""


def entrypoint(args: Sequence[str], *, python: str = "python", commands: Collection[str] | None = None) -> str:
    """The shell command a job runs: ``python -m lorahub_ray ARGS`` (quoted). ``commands``: the
    command names the job may run (the CLI passes its own app's), unchecked when None."""
    args = list(args)
    if not args:
        raise JobError("no command to run: give one after '--', e.g. -- search --model ... --output s3://...")
    if commands is not None and args[0] not in commands:
        raise JobError(f"unknown lorahub-ray command '{args[0]}' to submit; use one of {', '.join(sorted(commands))}")
    return shlex.join([python, "-m", "lorahub_ray", *args])


def parse_env(items: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``KEY=VALUE`` sets a variable; a bare ``KEY`` forwards its value here (an error if unset)."""
    environ = os.environ if environ is None else environ
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "a").isalnum():
            raise JobError(f"bad --env '{item}': write KEY=VALUE, or KEY to forward its value from here")
        if not sep:
            if key not in environ:
                raise JobError(f"--env {key}: {key} is not set here, so there is nothing to forward")
            value = environ[key]
        env[key] = value
    return env


def runtime_env(*, file: str | Path | None = None, working_dir: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> dict:
    """A Ray ``runtime_env``: the YAML/JSON ``file`` if given, then ``working_dir`` and ``env`` on top."""
    result: dict = {}
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise JobError(f"runtime env file '{file}' does not exist")
        import yaml  # JSON is YAML too

        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise JobError(f"runtime env file '{file}' is not valid YAML/JSON ({exc})") from None
        if not isinstance(loaded, dict):
            raise JobError(f"runtime env file '{file}' must hold a mapping (working_dir, env_vars, pip, ...)")
        result.update(loaded)
    if working_dir is not None:
        if not Path(working_dir).is_dir():
            raise JobError(f"working dir '{working_dir}' is not a directory")
        result["working_dir"] = str(Path(working_dir).resolve())
    if env:
        result["env_vars"] = {**result.get("env_vars", {}), **env}
    return result


def client(address: str):
    """A ``JobSubmissionClient`` for ``address``, once its server answers (one line otherwise). A
    head that asks for a token (``ray start --head`` turns token auth on where ``~/.ray/auth_token``
    exists) gets the local token, as Ray does for a cluster it detects itself."""
    check_dashboard(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    asked = False  # for a token, once
    while True:
        try:
            return JobSubmissionClient(address)
        except AuthenticationError:
            if asked:
                raise JobError(f"the Ray job API at {address} refused this machine's token; give the cluster's "
                               "token in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token") from None
            if not token_auth():
                raise JobError(f"the Ray job API at {address} asks for token authentication: set RAY_AUTH_MODE=token "
                               "and give the cluster's token in $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
                               "~/.ray/auth_token") from None
            asked = True
        except Exception as exc:  # ConnectionError, or a RuntimeError wrapping it
            raise JobError(f"cannot reach the Ray job API at {address} ({type(exc).__name__}: {exc})") from None


def submit(address: str, args: Sequence[str], *, commands: Collection[str] | None = None,
           runtime_env: dict | None = None, submission_id: str | None = None,
           entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
           metadata: Mapping[str, str] | None = None, agent_wait_s: float = 120, python: str = "python") -> str:
    """Submit ``lorahub-ray ARGS`` as a Ray job; returns its submission id. A cluster whose job agent
    is not up yet (just started) is asked again for up to ``agent_wait_s`` seconds."""
    command = entrypoint(args, python=python, commands=commands)
    jobs = client(address)
    kwargs = {}
    if entrypoint_num_cpus is not None:
        kwargs["entrypoint_num_cpus"] = entrypoint_num_cpus
    if entrypoint_num_gpus is not None:
        kwargs["entrypoint_num_gpus"] = entrypoint_num_gpus
    import time

    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return jobs.submit_job(entrypoint=command, runtime_env=runtime_env or None, submission_id=submission_id,
                                   metadata={"tool": "lorahub-ray", **(metadata or {})}, **kwargs)
        except Exception as exc:
            # a cluster that has just started answers 500 until its job agent is up: ask again for a while
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(1)
                continue
            raise JobError(f"job submission to {address} failed ({type(exc).__name__}: {exc})") from None


@dataclass
class JobResult:
    job_id: str
    status: str  # SUCCEEDED, FAILED or STOPPED
    message: str | None

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


def wait(address: str, job_id: str, *, follow: Callable[[str], None] | None = None,
         poll_seconds: float = 1.0) -> JobResult:
    """Follow a job's logs (with ``follow``) or poll its status until it ends; return its final status."""
    import asyncio
    import time

    jobs = client(address)
    if follow is not None:
        async def tail():
            async for chunk in jobs.tail_job_logs(job_id):
                follow(chunk)

        asyncio.run(tail())  # returns when the job has ended and its log is closed
        poll_seconds = 0.2  # the log may close a moment before the status is final
    info = jobs.get_job_info(job_id)
    while _status(info.status) not in TERMINAL:
        time.sleep(poll_seconds)
        info = jobs.get_job_info(job_id)
    return JobResult(job_id, _status(info.status), info.message)


def _status(status) -> str:
    return getattr(status, "value", str(status))


def describe(runtime: dict) -> str:
    shown = {k: ({e: "…" for e in v} if k == "env_vars" else v) for k, v in runtime.items()}
    return json.dumps(shown)
