"""Distributed search on Ray Tune: budget, equality with the core, fault tolerance, resume, restarts,
resource checks and optimizer crashes. All on the session's local Ray (2 CPUs)."""

import json
import os
import signal
import sys

import nevergrad as ng
import numpy as np
import pyarrow.parquet as pq
import pytest

import lorahub_ray as lr
from helpers import assert_same_weights
from lorahub_ray.cluster.tune_search import ResourceError, SearchFailed, SearchInterrupted, lorahub_learning_ray

BUDGET = 8


def run(world, output, *, model=None, **kwargs):
    kwargs.setdefault("budget", BUDGET)
    kwargs.setdefault("progress", False)
    return lorahub_learning_ray(model or str(world["base"]), [str(world["hub"])], str(world["examples"]),
                                output=output, **kwargs)


def history(output):
    return pq.read_table(output / "history.parquet").to_pylist()


def test_two_workers_use_the_exact_budget_and_write_a_valid_recipe(world, ray_cluster, tmp_path):
    events = []
    result = run(world, tmp_path / "out", workers=2, callback=events.append)
    rows = history(tmp_path / "out")
    assert [r["step"] for r in rows] == list(range(BUDGET))
    assert {r["trial"] for r in rows} == {0}
    recipe = lr.Recipe.load(tmp_path / "out")
    assert recipe.search["workers"] == 2 and recipe.search["asks_per_trial"] == 2
    assert recipe.algorithm == result.trials[0].algorithm and recipe.algorithm not in ("", "NGOpt")
    assert len(recipe.weights) == 4 and recipe.objective == result.trials[0].objective
    assert (tmp_path / "out" / "search.png").stat().st_size > 0
    assert [e["evaluations"] for e in events] == list(range(1, BUDGET + 1)) + [BUDGET]  # + the final report
    model, _ = lr.build_model(tmp_path / "out")  # the recipe rebuilds the model the search saved
    assert_same_weights(model, lr.load_model(tmp_path / "out")[0])


def test_one_worker_equals_the_local_engine(world, ray_cluster, tmp_path):
    local = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), budget=BUDGET,
                                progress=False)
    remote = run(world, tmp_path / "out", workers=1)
    assert remote.recipe.weights == pytest.approx(local.recipe.weights, abs=1e-6)
    assert remote.recipe.objective == pytest.approx(local.recipe.objective, abs=1e-6)
    assert remote.recipe.algorithm == local.recipe.algorithm
    steps = np.array([e.weights for e in remote.trials[0].history])
    assert np.allclose(steps, [e.weights for e in local.search.history], rtol=0, atol=1e-6)


def test_more_asks_than_workers_share_forward_passes_reproducibly(world, ray_cluster, tmp_path):
    """3 candidates at a time on 1 actor: one call evaluates them together (one forward pass); each
    value is that candidate's objective, and the run repeats exactly."""
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.io.examples import read_examples
    from lorahub_ray.core.model import load_base_model
    from lorahub_ray.core.objective import FewShotObjective

    first = run(world, tmp_path / "a", workers=1, asks=3)
    again = run(world, tmp_path / "b", workers=1, asks=3)
    steps = first.trials[0].history
    assert len(steps) == BUDGET and first.recipe.search["asks_per_trial"] == 3
    assert [e.objective for e in steps] == [e.objective for e in again.trials[0].history]
    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    examples = read_examples(str(world["examples"]))
    objective = FewShotObjective(LoraComposer(base, lr.load_modules([str(world["hub"])])), tok, examples.inputs,
                                 examples.outputs)
    assert [e.objective for e in steps] == pytest.approx([objective(e.weights) for e in steps], rel=1e-6, abs=1e-6)


def test_killed_actor_is_restarted_and_the_search_finishes(world, ray_cluster, tmp_path):
    import ray

    killed = []

    def kill_once(event):
        if event["evaluations"] == 3 and not killed:
            actor = ray.get_actor(f"lorahub-evaluator-{event['run']}-0")
            ray.kill(actor, no_restart=False)
            killed.append(actor)

    result = run(world, tmp_path / "out", workers=2, callback=kill_once)
    assert killed
    assert len(result.trials[0].history) == BUDGET
    assert [r["step"] for r in history(tmp_path / "out")] == list(range(BUDGET))


def test_interrupted_run_resumes_without_repeating_evaluations(world, ray_cluster, tmp_path):
    out = tmp_path / "out"
    seen = []

    def interrupt(event):
        seen.append(event["evaluations"])
        if event["evaluations"] == 4:
            os.kill(os.getpid(), signal.SIGUSR1)  # what Ctrl-C does to Tune, without stopping pytest

    with pytest.raises(SearchInterrupted, match="--resume"):
        run(world, out, workers=1, callback=interrupt)
    assert not (out / "recipe.json").exists()
    done_before = max(seen)
    resumed = []
    result = lorahub_learning_ray(resume=out, progress=False, callback=lambda e: resumed.append(e["evaluations"]))
    assert resumed[0] > done_before - 1  # no told evaluation is run again
    assert [r["step"] for r in history(out)] == list(range(BUDGET))
    # the same answer as an uninterrupted run with the same seed
    whole = run(world, tmp_path / "whole", workers=1)
    assert result.recipe.weights == pytest.approx(whole.recipe.weights, abs=1e-9)


def test_restarts_on_module_subsets_pick_the_best_trial(world, ray_cluster, tmp_path):
    result = run(world, tmp_path / "out", workers=2, restarts=2, modules_per_restart=2, budget=6)
    assert len(result.trials) == 2
    assert [t.seed for t in result.trials] == [42, 43]
    assert result.recipe.objective == min(t.objective for t in result.trials)
    assert len(result.recipe.modules) == 2
    best = result.best
    assert [m["name"] for m in result.recipe.modules] == result.recipe.search["trials"][best.restart]["modules"]
    rows = history(tmp_path / "out")
    assert sorted({r["trial"] for r in rows}) == [0, 1]
    assert all(len(r["weights"]) == 2 for r in rows)


@pytest.mark.parametrize("kwargs, message", [
    ({"gpus_per_worker": 1}, r"GPU"),
    ({"gpus_per_worker": 0.25, "workers": 8}, r"GPU"),
    ({"cpus_per_worker": 4}, r"CPUs"),
])
def test_impossible_resources_fail_fast(world, ray_cluster, tmp_path, kwargs, message):
    kwargs.setdefault("workers", 2)
    with pytest.raises(ResourceError, match=message):
        run(world, tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


class CrashingOptimizer(ng.optimizers.registry["NGOpt"]):
    """Raises inside ask() as nevergrad 1.0.12 does on numpy 2.4."""

    def _internal_ask_candidate(self):
        if self.num_ask >= 3:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return super()._internal_ask_candidate()


def test_crash_inside_the_optimizer_fails_the_run_with_its_error(world, ray_cluster, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trial process cannot import this test file
    with pytest.raises(SearchFailed, match="only 0-dimensional arrays"):
        run(world, tmp_path / "out", workers=1, optimizer=CrashingOptimizer, max_failures=0)


def test_cli_reports_impossible_resources_in_one_line(world, ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    result = CliRunner().invoke(app, ["search", "-m", str(world["base"]), "--modules", str(world["hub"]), "-e",
                                      str(world["examples"]), "-o", str(tmp_path / "out"), "--workers", "2",
                                      "--gpus-per-worker", "0.5"])
    assert result.exit_code == 2
    assert "GPU" in result.output and "Traceback" not in result.output


def test_s3_output_keeps_the_experiment_on_s3_and_resumes_from_there(world, ray_cluster, tmp_path):
    """``--output s3://...``: Tune's experiment state lives beside it on S3 (where every node of a
    cluster reaches it), an interrupted run resumes from the S3 URI alone, and the output is uploaded
    with recipe.json last."""
    from s3 import moto_server, s3fs_client

    with moto_server():
        fs = s3fs_client()
        fs.mkdir("tune-runs")  # moto keeps buckets per process: a name of this test's own
        out = "s3://tune-runs/task"
        seen = []

        def interrupt(event):
            seen.append(event["evaluations"])
            if event["evaluations"] == 4:
                os.kill(os.getpid(), signal.SIGUSR1)

        with pytest.raises(SearchInterrupted, match="--resume s3://tune-runs/task"):
            run(world, out, workers=1, callback=interrupt)
        assert not fs.exists("tune-runs/task/recipe.json")
        assert fs.exists("tune-runs/task.tune/lorahub-run.json") and fs.find("tune-runs/task.tune/search")  # Tune's state, on S3
        resumed = []
        result = lorahub_learning_ray(resume=out, progress=False, callback=lambda e: resumed.append(e["evaluations"]))
        assert resumed[0] > max(seen) - 1
        assert result.output == out
        files = {p.removeprefix("tune-runs/task/") for p in fs.find("tune-runs/task")}
        assert {"recipe.json", "history.parquet", "search.png", "model/config.json"} <= files
        fs.get("tune-runs/task", str(tmp_path / "down"), recursive=True)
        assert [r["step"] for r in history(tmp_path / "down")] == list(range(BUDGET))
        whole = run(world, tmp_path / "whole", workers=1)
        assert result.recipe.weights == pytest.approx(whole.recipe.weights, abs=1e-9)
        model, _ = lr.build_model(out)  # the recipe on S3 rebuilds the model the search uploaded
        assert_same_weights(model, lr.load_model(out)[0])


def test_an_evaluator_that_cannot_start_fails_the_run_once_with_its_cause(world, ray_cluster, tmp_path):
    with pytest.raises(SearchFailed, match="an evaluator failed to start: .*(CUDA|cuda)"):
        run(world, tmp_path / "out", workers=1, device="cuda")  # a CPU-only cluster
    assert not (tmp_path / "out" / "recipe.json").exists()
    # reported once, as the trial's only result, not retried by Tune (a retry would leave an error behind)
    (trial,) = [p.parent for p in (tmp_path / "out.tune").rglob("result.json")]
    (row,) = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]
    assert "failed to start" in row["startup_error"] and not list(trial.glob("error.*"))


def test_a_wrong_base_model_fails_before_ray_starts_anything(world, ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(lr.LoraHubError, match="no usable config.json"):
        run(world, tmp_path / "out", model=str(tmp_path / "empty"), workers=1)


def test_asha_stops_restarts_early_and_the_best_restart_still_wins(world, ray_cluster, tmp_path):
    """Four restarts on module subsets under ASHA (rungs at 3 and 6 evaluations for a budget of 12,
    halving): a restart that reaches a rung behind the others is stopped there. Which ones are
    stopped depends on the order they reach the rungs; what must hold either way: a stopped restart
    ends at a rung, a finished one used its whole budget and gave its final recommendation, and the
    recipe is the best restart's, among finished and stopped ones alike."""
    budget = 12
    result = run(world, tmp_path / "out", workers=2, restarts=4, modules_per_restart=2, budget=budget,
                 scheduler="asha")
    trials = result.recipe.search["trials"]
    assert len(trials) == 4 and result.recipe.search["scheduler"] == "asha"
    finished = [t for t in trials if t["finished"]]
    stopped = [t for t in trials if not t["finished"]]
    assert finished, "the best restart at every rung goes on to the end"
    assert all(t["evaluations"] == budget for t in finished)
    assert all(3 <= t["evaluations"] < budget for t in stopped)  # at a rung (3, 6), give or take one in flight
    assert result.recipe.objective == min(t["objective"] for t in trials)
    rows = history(tmp_path / "out")
    assert len(rows) == sum(t["evaluations"] for t in trials)
    print("evaluations per restart under ASHA:", [t["evaluations"] for t in trials])


def test_restarts_that_would_repeat_one_search_are_warned_about():
    from lorahub_ray.cluster.tune_search import restarts_warning

    # NGOpt at 20 weights, budget 40, one ask at a time runs Cobyla, which ignores the seed
    note = restarts_warning("NGOpt", 20, budget=40, asks=1, restarts=5, modules_per_restart=None)
    assert note and "Cobyla" in note and "modules_per_restart" in note
    assert restarts_warning("NGOpt", 20, budget=40, asks=1, restarts=5, modules_per_restart=10) is None
    assert restarts_warning("NGOpt", 20, budget=40, asks=1, restarts=1, modules_per_restart=None) is None
    assert restarts_warning("CMA", 20, budget=40, asks=1, restarts=5, modules_per_restart=None) is None
    assert restarts_warning("RandomSearch", 20, budget=40, asks=1, restarts=5, modules_per_restart=None) is None


def test_cli_shows_lorahub_rays_own_warning_in_one_line(world, ray_cluster, tmp_path):
    """The real command, in its own process: ``quiet_libraries`` silences the libraries' UserWarnings, but
    lorahub-ray's LoraHubWarning (a UserWarning too) still reaches the console, as one line."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "lorahub_ray", "search", "-m", str(world["base"]), "--modules", str(world["hub"]),
         "-e", str(world["examples"]), "-o", str(tmp_path / "out"), "--workers", "1", "--restarts", "2",
         "--budget", "4", "--address", ray_cluster["address"]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "differ only by their seed" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("warning: the 2 restarts differ only by their seed, but NGOpt runs Cobyla")
    assert lines[0].endswith("or choose a stochastic optimizer.")  # the whole message on that one line
    assert "LoraHubWarning" not in done.stderr and "tune_search.py" not in done.stderr  # not Python's format
    assert len(lr.Recipe.load(tmp_path / "out").search["trials"]) == 2  # and the search ran to its end
