import os
import signal

import pytest

from helpers import EXAMPLES, make_base, make_module, start_ray_head, write_jsonl

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


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray head for the whole session (2 CPUs, loopback, dashboard and job API on),
    with this process connected as a driver. Yields ``{"address", "dashboard"}``.

    The head runs under ``ray start --block`` in its own process group, which is ended at the
    end of the session (or, after a timeout, when pytest exits): other Ray clusters on the machine
    are left alone.
    """
    import ray

    # Ray 2.60 turns token auth on for `ray start` when ~/.ray/auth_token exists (any local
    # ray.init() writes one), but a driver connecting by address does not send it: this
    # loopback-only test cluster runs without auth, for the head and this driver alike
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    head, address, dash = start_ray_head(log, env, num_cpus=2, timeout=180)
    try:  # the head is ended even when connecting fails
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        ray.shutdown()
        os.killpg(head.pid, signal.SIGKILL)  # SIGTERM takes ~30 s for the same result
        head.wait(timeout=60)
        log.close()
