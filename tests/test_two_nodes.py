"""Many nodes, for real: a 2-node Ray cluster on loopback (``ray start --head`` plus ``ray start --address``
as a second node with its own resources, each in its own process group), S3 (moto) as the shared storage
for the output and the run's state. The worker node's raylet is killed by its pid mid-search; the
search still finishes with its full budget and gives the undisturbed run's result.

The driver runs in a subprocess (this test process is already a driver of the session's cluster).
A placeholder actor holds the head's CPUs at the start, so that both evaluators start on the worker
node; at the kill it is released, and Ray restarts the evaluators on the head.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ray_port_args
from s3 import moto_server, s3fs_client

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

DRIVER = r"""
import json, os, signal, sys
import ray
from lorahub_ray.cluster.ray_search import lorahub_learning_ray

args = json.loads(sys.argv[1])
ray.init(address=args["address"], logging_level="ERROR", log_to_driver=False)

@ray.remote(num_cpus=2, resources={"head": 0.01})
class Placeholder:
    def node(self):
        return ray.get_runtime_context().get_node_id()

holder = Placeholder.remote()
ray.get(holder.node.remote())
nodes, killed = set(), []

def on_event(event):
    if event["evaluations"] == 1 and event["restart"] == 0:
        for i in range(2):
            actor = ray.get_actor(f"lorahub-evaluator-{event['run']}-{i}")
            nodes.add(ray.get(actor.ready.remote())["node"])
    if args["kill"] and event["evaluations"] == 3 and event["restart"] == 0 and not killed:
        ray.kill(holder)  # room on the head for the restarted evaluators
        os.kill(args["raylet"], signal.SIGKILL)
        killed.append(args["raylet"])

result = lorahub_learning_ray(args["model"], [args["hub"]], args["examples"], output=args["output"], workers=2,
                              cpus_per_worker=0.9, budget=args["budget"], progress=False, callback=on_event)
head = [n["NodeID"] for n in ray.nodes() if n["Resources"].get("head")]
print("RESULT " + json.dumps({"weights": result.recipe.weights, "objective": result.recipe.objective,
                              "evaluations": [len(o.history) for o in result.restarts],
                              "objectives": [o.objective for o in result.restarts],
                              "on_head": sorted(n in head for n in nodes), "killed": killed}))
"""


def _start(args: list[str], env: dict, log: Path, ports: list[str] | None = None) -> subprocess.Popen:
    # every port of its own, chosen together: the defaults (52365, ...) are taken by any other Ray on the
    # machine, and ports picked one at a time may coincide
    return subprocess.Popen(args + (ports or ray_port_args(head=False)[0]), env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _raylet_of(group: int) -> int:
    """The pid of the raylet in process group ``group`` (the worker node's ``ray start --block``)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            comm = (proc / "comm").read_text().strip()
            pgid = os.getpgid(int(proc.name))
        except (OSError, ProcessLookupError):
            continue
        if comm == "raylet" and pgid == group:
            return int(proc.name)
    raise RuntimeError(f"no raylet in process group {group}")


def _wait_for_nodes(address: str, env: dict, count: int, deadline: float, logs: Path,
                    node: subprocess.Popen | None = None) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    while time.monotonic() < deadline:
        try:
            out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                                 timeout=90)
        except subprocess.TimeoutExpired:
            continue
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        if node is not None and node.poll() is not None:
            break  # the node's `ray start` gave up
        time.sleep(5)
    tails = "".join(f"\n--- {p.name}\n" + p.read_text()[-2000:] for p in sorted(logs.glob("*.log")))
    raise RuntimeError(f"the cluster at {address} did not reach {count} nodes{tails}")


def _drive(address: str, env: dict, world, output: str, *, kill: int | None, budget: int) -> dict:
    args = {"address": address, "model": str(world["base"]), "hub": str(world["hub"]),
            "examples": str(world["examples"]), "output": output, "budget": budget, "kill": kill is not None,
            "raylet": kill or 0}
    out = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], env=env, capture_output=True, text=True,
                         timeout=600)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT "))


def test_search_survives_the_loss_of_a_worker_node(world, tmp_path):
    budget = 6
    with moto_server():
        fs = s3fs_client()
        fs.mkdir("two-nodes")
        ray_bin = str(Path(sys.executable).with_name("ray"))
        env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        head_ports, chosen = ray_port_args()
        address = f"127.0.0.1:{chosen['port']}"
        common = ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1", "--num-gpus=0"]
        head = _start([ray_bin, "start", "--head", "--num-cpus=2", "--include-dashboard=false",
                       '--resources={"head": 1}', *common], env, tmp_path / "head.log", head_ports)
        worker = None
        try:
            _wait_for_nodes(address, env, 1, time.monotonic() + 180, tmp_path)
            for attempt in range(3):  # on a busy machine a raylet may miss Ray's 30 s start window: again
                worker = _start([ray_bin, "start", f"--address={address}", "--num-cpus=2",
                                 '--resources={"worker": 1}', *common], env, tmp_path / f"worker-{attempt}.log")
                try:
                    _wait_for_nodes(address, env, 2, time.monotonic() + 120, tmp_path, worker)
                    break
                except RuntimeError:
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait(timeout=60)
                    worker = None
                    if attempt == 2:
                        raise
            undisturbed = _drive(address, env, world, "s3://two-nodes/calm", kill=None, budget=budget)
            assert undisturbed["on_head"] == [False]  # the evaluators ran on the worker node only
            raylet = _raylet_of(worker.pid)
            disturbed = _drive(address, env, world, "s3://two-nodes/storm", kill=raylet, budget=budget)
        finally:
            for proc in (worker, head):
                if proc is not None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
        assert disturbed["killed"] == [raylet] and disturbed["on_head"] == [False]
        assert disturbed["evaluations"] == [budget, budget]  # the full budget, after the node was lost
        assert disturbed["objectives"] == pytest.approx(undisturbed["objectives"], abs=1e-9)
        assert disturbed["weights"] == pytest.approx(undisturbed["weights"], abs=1e-9)
        assert fs.exists("two-nodes/storm/recipe.json") and fs.exists("two-nodes/storm.search/lorahub-run.json")
        assert fs.glob("two-nodes/storm.search/search/experiment_state*.json")  # Tune's experiment, on S3
