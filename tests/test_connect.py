"""The one connection policy (lorahub_ray.cluster.connect), through the real commands in fresh
processes: a dead named address fails in one line, a stale auto-detected one starts a local Ray,
a dashboard address is refused, and `submit` reaches a head that asks for a token."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import start_ray_head
from ports import free_port

REPO = Path(__file__).parents[1]
HANG_GUARD_S = 240  # a dead address used to hang for minutes; a busy 2-core machine imports torch slowly




def lorahub(*args, env=None, timeout=HANG_GUARD_S, alone=False):
    """``python -m lorahub_ray ARGS`` in a fresh process (its own Ray state); (code, output). With
    ``alone`` it runs in a PID namespace of its own (``unshare``, as root), so that it sees no other
    process of this machine: Ray's ``auto`` joins any live Ray it finds among the processes (the
    tests' own session head, say), and a machine whose earlier Ray runs had all ended has none."""
    base = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    base.update(PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    prefix = ["unshare", "--pid", "--fork", "--mount-proc"] if alone else []
    done = subprocess.run([*prefix, sys.executable, "-m", "lorahub_ray", *map(str, args)], env=base,
                          cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


@pytest.fixture()
def ray_tmpdir():
    """Ray's temp dir for one test ($RAY_TMPDIR, whose ray/ holds ray_current_cluster); short, for
    Ray's socket paths."""
    path = Path(tempfile.mkdtemp(prefix="lhr-"))
    (path / "ray").mkdir()
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def test_a_named_dead_address_fails_in_one_line(world):
    dead = f"127.0.0.1:{free_port()}"
    code, text = lorahub("evaluate", "--model", world["base"], "--data", world["examples"], "--workers", 1,
                         "--address", dead)
    assert code == 2, text
    assert error_lines(text) == [f"error: no Ray cluster answers at --address '{dead}' within 5 s; check the address, "
                                 "or leave it out for a local Ray"], text
    assert "Traceback" not in text
    code, text = lorahub("search", "--model", world["base"], "--modules", ",".join(map(str, world["modules"][:2])),
                         "--examples", world["examples"], "--output", world["root"] / "never", "--workers", 1,
                         env={"RAY_ADDRESS": dead})
    assert code == 2, text
    assert len(error_lines(text)) == 1 and f"$RAY_ADDRESS '{dead}'" in text, text
    assert not (world["root"] / "never").exists()


def test_a_dashboard_address_is_refused_for_the_cluster(world):
    code, text = lorahub("evaluate", "--model", world["base"], "--data", world["examples"], "--workers", 1,
                         "--address", "http://127.0.0.1:8265")
    assert code == 2, text
    assert len(error_lines(text)) == 1 and "dashboard (Jobs API) address" in text and "lorahub-ray submit" in text


def test_a_stale_auto_detected_cluster_starts_a_local_ray(world, ray_tmpdir, tmp_path):
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmpdir / "ray" / "ray_current_cluster").write_text(dead)  # what a crashed `ray start` leaves behind
    code, text = lorahub("evaluate", "--model", world["base"], "--data", world["examples"], "--workers", 1,
                         "--max-new-tokens", 4, "--output", tmp_path / "eval", "--address", "auto",
                         env={"RAY_TMPDIR": str(ray_tmpdir)}, alone=True)
    assert code == 0, text
    warned = [line for line in text.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and "does not answer; starting a local Ray instead" in warned[0], text
    assert (tmp_path / "eval" / "metrics.json").is_file()
    sessions = [p for p in (ray_tmpdir / "ray").iterdir() if p.name.startswith("session_2")]
    assert sessions, "the local Ray did not run in the test's own temp dir"


@pytest.fixture()
def token_head(tmp_path):
    """A head started by `ray start --head` where ~/.ray/auth_token exists (a temporary HOME), with
    RAY_AUTH_MODE unset, so Ray turns token auth on. Its own process group, ended at the end."""
    home = Path(tempfile.mkdtemp(prefix="lhr-home-"))
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("lorahub-ray-test-token-0123456789abcdef\n")
    ray_tmp = Path(tempfile.mkdtemp(prefix="lhr-"))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), RAY_TMPDIR=str(ray_tmp), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    log = open(tmp_path / "head.log", "w")
    head, _, dash = start_ray_head(log, env, num_cpus=1, timeout=240)
    try:
        yield {"home": home, "dashboard": f"http://127.0.0.1:{dash}", "log": Path(log.name)}
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        import shutil

        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_submit_sends_the_token_a_head_asks_for(token_head):
    assert "Token authentication is enabled" in token_head["log"].read_text()  # the head asks for a token
    args = ("submit", "--address", token_head["dashboard"], "--python", sys.executable, "--wait", "--", "demo", "--help")
    code, text = lorahub(*args, env={"HOME": str(token_head["home"])})
    assert code == 0, text
    assert "SUCCEEDED" in text and "Authentication" not in text, text
    # told not to use a token, submit says what to set, in one line
    code, text = lorahub(*args, env={"HOME": str(token_head["home"]), "RAY_AUTH_MODE": "disabled"})
    assert code == 2, text
    assert error_lines(text) == [f"error: the Ray job API at {token_head['dashboard']} asks for token authentication: "
                                 "set RAY_AUTH_MODE=token and give the cluster's token in $RAY_AUTH_TOKEN, "
                                 "$RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"], text


def test_submit_to_a_dead_job_api_fails_in_one_line():
    url = f"http://127.0.0.1:{free_port()}"
    code, text = lorahub("submit", "--address", url, "--", "compare", "--help")
    assert code == 2, text
    assert error_lines(text) == [f"error: no Ray job API answers at {url} within 5 s; is the head running "
                                 "(with its dashboard)?"], text


def test_one_cpu_share_for_evaluators_and_data_actors(ray_cluster):
    from lorahub_ray.cluster.connect import connect, default_cpus_per_worker

    assert connect(ray_cluster["address"]) is False  # an initialised Ray is used as is, not restarted
    assert connect("http://127.0.0.1:1") is False  # ... whatever the address says
    # the session's head has 2 CPUs: Tune keeps 0.01 per trial free, Ray Data one CPU for its reads
    assert default_cpus_per_worker(2, reserved=2 * 0.01) == 0.99
    assert default_cpus_per_worker(4, reserved=1.0) == 0.25
    assert default_cpus_per_worker(1) == 1.0  # at most one CPU each
    assert default_cpus_per_worker(50, reserved=1.0) == 0.1  # at least 0.1
