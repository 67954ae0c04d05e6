import os
import signal
import sys

import pytest

from helpers import EXAMPLES, end_with_this_process, make_base, make_module, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny base model, four LoRA modules in one folder, and five few-shot examples."""
    root = tmp_path_factory.mktemp("world")
    base = make_base(root / "base")
    hub = root / "hub"
    modules = [make_module(base, hub / name, seed=i + 1) for i, name in enumerate(["alpha", "beta", "gamma", "delta"])]
    examples = write_jsonl(root / "fewshot.jsonl", EXAMPLES)
    return {"root": root, "base": base, "hub": hub, "modules": modules, "examples": examples}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORAHUB_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray head for the whole session (2 CPUs, loopback, dashboard and job API on),
    with this process connected as a driver. Yields ``{"address", "dashboard"}``.

    The head runs under ``ray start --block`` in its own process group, which is ended at the
    end of the session (or, after a timeout, when pytest exits): other Ray clusters on the machine
    are left alone.
    """
    import subprocess
    import time
    from pathlib import Path

    import ray

    port, dash, agent = _free_port(), _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    # Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists (any local
    # ray.init() writes one), but a driver connecting by address does not send it: this
    # loopback-only test cluster runs without auth, for the head and this driver alike
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--num-cpus=2", "--num-gpus=0", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
         f"--dashboard-agent-listen-port={agent}",  # the default, 52365, is taken by any other head here
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        preexec_fn=end_with_this_process)
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    import socket

    try:  # the head is ended even when connecting fails
        while True:  # wait for the dashboard (the last thing the head starts), then connect
            try:
                socket.create_connection(("127.0.0.1", dash), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray head did not start; see {log.name}") from None
                time.sleep(0.5)
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGKILL)  # SIGTERM takes ~30 s for the same result
        head.wait(timeout=60)
        log.close()
