"""The one way lorahub-ray connects to Ray (search, evaluate, compare, serve) and checks a Jobs address.

Which cluster, in this order:

- a Ray this process has already initialised is used as it is;
- ``address`` if given, else ``$RAY_ADDRESS`` if set, else ``"local"``;
- ``"local"``: a private Ray started here on demand (never some other cluster on the machine);
- ``"auto"``: the cluster Ray itself detects (the last ``ray start`` named in ``ray_current_cluster``
  in Ray's temp dir, ``$RAY_TMPDIR/ray`` or ``/tmp/ray``, else a running GCS on this machine);
- ``host:port`` (a GCS) or ``ray://host:10001`` (Ray Client);
- ``http(s)://`` is a dashboard, i.e. the Jobs API: one clear error (use ``lorahub-ray submit``).

Before ``ray.init`` the address must answer a TCP connect within :data:`ANSWER_TIMEOUT_S` seconds,
so a dead or stale cluster never hangs a command: an auto-detected address that does not answer
starts a local Ray instead (one :class:`~lorahub_ray.errors.LoraHubWarning` line), a named one
fails with one :class:`ClusterError` line naming it. :func:`check_dashboard` does the same for the
Jobs API, and :func:`token_auth` turns Ray's token authentication on when a head asks for it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import warnings
from urllib.parse import urlparse

import ray

from lorahub_ray.errors import LoraHubError, LoraHubWarning

ANSWER_TIMEOUT_S = 5.0  # a live GCS accepts a TCP connection at once; a dead one refuses or never answers
# environment that workers need to reach the same storage as the driver
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "LORAHUB_RAY_CACHE",
                 "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN")


class ClusterError(LoraHubError):
    """A Ray cluster (or its job API) that cannot be reached or used at the address given."""


def connect(address: str | None = None, *, dashboard: bool = False, **init_kwargs) -> bool:
    """Connect this process to Ray by the policy above; True when this call started a local Ray
    (the caller shuts down what it started). ``dashboard`` starts the dashboard with a local Ray;
    ``init_kwargs`` go to ``ray.init``."""
    if ray.is_initialized():
        return False
    source = "--address"
    if address is None:
        address, source = os.environ.get("RAY_ADDRESS") or "local", "$RAY_ADDRESS"
    address = address.strip()
    kwargs = {"logging_level": "ERROR", "log_to_driver": False, **init_kwargs}
    if address.startswith(("http://", "https://")):
        raise ClusterError(f"{source} '{address}' is a dashboard (Jobs API) address; give the cluster's GCS "
                           "address (host:6379), 'auto' or ray://host:10001, or run the command on the cluster "
                           "with `lorahub-ray submit`")
    if address == "local":
        _start_local(dashboard, kwargs)
        return True
    if address == "auto":
        found = detect()
        if found is None or not answers(found):
            where = f"the detected cluster at {found} does not answer" if found else "no running Ray cluster found"
            warnings.warn(f"address 'auto': {where}; starting a local Ray instead", LoraHubWarning, stacklevel=2)
            _start_local(dashboard, kwargs)
            return True
        token_auth()  # what ray.init(address="auto") does
        _init(found, source, kwargs)
        return False
    target = address.removeprefix("ray://")
    if address.startswith("ray://") and ":" not in target.rsplit("]", 1)[-1]:
        target += ":10001"  # Ray Client's default port
    if not answers(target):
        raise ClusterError(f"no Ray cluster answers at {source} '{address}' within {ANSWER_TIMEOUT_S:g} s; "
                           "check the address, or leave it out for a local Ray")
    _init(address, source, kwargs)
    return False


def _start_local(dashboard: bool, kwargs: dict) -> None:
    try:
        ray.init(address="local", include_dashboard=dashboard, **kwargs)
    except Exception as exc:  # e.g. "The current node timed out during startup" on an overloaded machine
        ray.shutdown()  # whatever part of it did start
        raise ClusterError(f"could not start a local Ray: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _init(address: str, source: str, kwargs: dict) -> None:
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # ConnectionError, RuntimeError, AuthenticationError, ...
        text = _first_line(exc)
        if "auth" in str(exc).lower():
            text = ("the cluster asks for token authentication; set RAY_AUTH_MODE=token and give its token "
                    "($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)")
        raise ClusterError(f"cannot connect to the Ray cluster at {source} '{address}': {text}") from None


def detect() -> str | None:
    """The ``host:port`` that Ray's own ``address="auto"`` would join, or None when it finds none."""
    from ray._private import services  # Ray's own resolution: ray_current_cluster, then a running GCS

    with _quiet(services.__name__):  # "Found multiple active Ray instances": we say what we do
        try:
            return services.canonicalize_bootstrap_address_or_die("auto")
        except (ConnectionError, ValueError):
            return None


@contextlib.contextmanager
def _quiet(logger_name: str):
    """A library logger held at ERROR for a moment."""
    chatter = logging.getLogger(logger_name)
    level = chatter.level
    chatter.setLevel(logging.ERROR)
    try:
        yield
    finally:
        chatter.setLevel(level)


def answers(address: str, timeout: float = ANSWER_TIMEOUT_S) -> bool:
    """Whether ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"address '{address}' is not host:port")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_dashboard(url: str, timeout: float = ANSWER_TIMEOUT_S) -> None:
    """One :class:`ClusterError` line unless ``url`` is an http(s) address whose server answers."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ClusterError(f"--address '{url}' must be the job API's URL, e.g. http://HEAD:8265")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not answers(f"{parsed.hostname}:{port}", timeout):
        raise ClusterError(f"no Ray job API answers at {url} within {timeout:g} s; is the head running "
                           "(with its dashboard)?")


def token_auth() -> bool:
    """Turn Ray's token authentication on for this process when ``RAY_AUTH_MODE`` is unset and a
    token is available ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token), as
    ``ray start --head`` does for the head itself. Returns whether it is on. ``ray.init`` applies
    this rule to auto-detected clusters only; the Jobs client calls it once a head answers 401."""
    from ray._private.authentication import authentication_token_setup as auth  # Ray's own switch

    with _quiet(auth.__name__):  # its notice on opting out: the caller says what it needs
        return auth.maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def default_cpus_per_worker(workers: int, reserved: float = 0.0) -> float:
    """The CPU share of one evaluator (Ray search) or Ray Data actor: an equal share of the
    cluster's CPUs after ``reserved`` CPUs kept free for the work beside the actors (none for the
    search; Ray Data's read and shuffle tasks, which stall if actors hold every CPU),
    rounded down to 0.01, at most 1 and at least 0.1."""
    have = float(ray.cluster_resources().get("CPU", 0.0))
    share = math.floor((have - reserved) / max(1, workers) * 100) / 100
    return max(0.1, min(1.0, share))


def worker_env() -> dict[str, str]:
    """The variables of :data:`FORWARDED_ENV` that are set here."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def runtime_env() -> dict:
    """The ``runtime_env`` that gives Ray workers this process's storage settings ({} if none)."""
    env = worker_env()
    return {"env_vars": env} if env else {}
