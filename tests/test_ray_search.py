"""The search on Ray: a portfolio of restarts in lockstep over model-holding actors. Restart 0 equals
the one-process search, the winner is never worse, runs repeat exactly; fault tolerance, resume,
subsets, halving, resource checks and optimizer crashes. All on the session's Ray head (2 CPUs)."""

import os
import signal
import sys

import nevergrad as ng
import numpy as np
import pyarrow.parquet as pq
import pytest

import lorahub_ray as lr
from lorahub_ray.cluster.restarts import canonical, rungs, split_round
from helpers import assert_same_weights
from lorahub_ray.cluster.ray_search import ResourceError, SearchFailed, SearchInterrupted, lorahub_learning_ray
from lorahub_ray.core.portfolio import plan_restarts
from lorahub_ray.errors import LoraHubWarning

BUDGET = 8


def run(world, output, *, model=None, ray_cluster=None, **kwargs):
    kwargs.setdefault("budget", BUDGET)
    kwargs.setdefault("progress", False)
    if ray_cluster is not None:
        kwargs.setdefault("address", ray_cluster["address"])
    return lorahub_learning_ray(model or str(world["base"]), [str(world["hub"])], str(world["examples"]),
                                output=output, **kwargs)


def history(output):
    return pq.read_table(output / "history.parquet").to_pylist()


def one_process(world, budget=BUDGET):
    return lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), budget=budget,
                               progress=False)


# --- the restart plan and the round split (no Ray) ----------------------------------------------


def test_restart_zero_is_the_one_process_plan_and_the_others_are_diversified():
    plans = plan_restarts(6, 4, seed=7, optimizer="NGOpt", portfolio=["CMA", "OnePlusOne"])
    assert (plans[0].seed, plans[0].modules, plans[0].optimizer) == (7, list(range(6)), "NGOpt")
    assert [p.seed for p in plans] == [7, 8, 9, 10]
    assert [p.optimizer for p in plans] == ["NGOpt", "CMA", "OnePlusOne", "CMA"]
    assert all(sorted(p.modules) == list(range(6)) for p in plans)
    assert len({tuple(p.modules) for p in plans}) == 4  # every order differs (seeded permutations)
    assert plans == plan_restarts(6, 4, seed=7, optimizer="NGOpt", portfolio=["CMA", "OnePlusOne"])  # repeatable
    subsets = plan_restarts(10, 3, seed=1, optimizer="NGOpt", modules_per_restart=4, candidates=[0, 2, 4, 6, 8])
    assert subsets[0].modules == sorted(subsets[0].modules)
    assert all(len(p.modules) == 4 and set(p.modules) <= {0, 2, 4, 6, 8} for p in subsets)
    with pytest.raises(lr.LoraHubError, match="restarts must be at least 1"):
        plan_restarts(3, 0, seed=1, optimizer="NGOpt")


def test_a_round_is_split_by_its_size_and_the_workers_only():
    assert split_round(5, 2) == [range(0, 3), range(3, 5)]
    assert split_round(2, 3) == [range(0, 1), range(1, 2), range(2, 2)]
    for n, w in [(1, 1), (7, 3), (16, 4), (3, 8)]:
        shares = split_round(n, w)
        assert [j for s in shares for j in s] == list(range(n))
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert canonical([2, 0, 1], [0.2, 0.0, 0.1]) == ([0, 1, 2], [0.0, 0.1, 0.2])
    assert rungs(40) == [10, 20] and rungs(12) == [3, 6] and rungs(1) == []


def test_candidates_of_different_restarts_share_one_call_and_get_their_own_objective(world):
    """A round's share: candidates over different module subsets (canonical order) in one call; each
    value is the candidate's objective alone (its other modules at 0, the regulariser on its own
    weights), and a single whole-hub candidate is exactly objective(w)."""
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.model import load_base_model
    from lorahub_ray.io.examples import read_examples

    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    examples = read_examples(str(world["examples"]))
    objective = lr.FewShotObjective(LoraComposer(base, lr.load_modules([str(world["hub"])])), tok, examples.inputs,
                                    examples.outputs)
    candidates = [[0.5, -1.0, 0.25, 1.2], [0.7, -0.3], [1.1, 0.4, -0.6]]
    subsets = [[0, 1, 2, 3], [1, 3], [0, 2, 3]]
    shared = objective.evaluate_subsets(candidates, subsets)
    alone = [objective.evaluate_many([w], s)[0] for w, s in zip(candidates, subsets)]
    assert shared == pytest.approx(alone, rel=1e-6, abs=1e-6)
    assert objective.evaluate_subsets([candidates[0]], [subsets[0]]) == [objective(candidates[0])]
    assert alone[1] != pytest.approx(objective([0.0, 0.7, 0.0, -0.3]), abs=1e-6)  # the regulariser: own weights


# --- the portfolio on Ray -----------------------------------------------------------------------


def test_portfolio_restart_zero_equals_one_process_and_the_winner_is_no_worse(world, ray_cluster, tmp_path):
    local = one_process(world)
    events = []
    result = run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=2, callback=events.append)
    assert len(result.restarts) == 2  # the default: one restart per worker
    zero = result.restarts[0]
    assert zero.objective == pytest.approx(local.recipe.objective, abs=1e-6)
    assert np.allclose([e.weights for e in zero.history], [e.weights for e in local.search.history], atol=1e-6)
    assert zero.algorithm == local.recipe.algorithm
    assert result.recipe.objective <= local.recipe.objective + 1e-6  # the guarantee (actors run 1 thread: 1e-8 apart)
    assert result.recipe.objective == min(o.objective for o in result.restarts)
    recipe = lr.Recipe.load(tmp_path / "out")
    runs = recipe.search["restarts"]
    assert [r["seed"] for r in runs] == [42, 43] and recipe.search["best_restart"] == result.best.restart
    assert runs[0]["order"] == [m.name for m in lr.load_modules([str(world["hub"])])]  # the given order
    assert sorted(runs[1]["order"]) == sorted(runs[0]["order"]) and runs[1]["order"] != runs[0]["order"]
    assert all(r["evaluations"] == BUDGET and r["algorithm"] not in ("", "NGOpt") for r in runs)
    rows = history(tmp_path / "out")
    assert sorted({r["restart"] for r in rows}) == [0, 1]
    assert all([r["step"] for r in rows if r["restart"] == k] == list(range(BUDGET)) for k in (0, 1))
    assert sorted(e["evaluations"] for e in events if e["restart"] == 1) == list(range(1, BUDGET + 1))
    assert (tmp_path / "out" / "search.png").stat().st_size > 0
    model, tok = lr.build_model(tmp_path / "out")  # the recipe rebuilds the same model
    a, b = model.state_dict(), result.model.state_dict()
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)


def test_more_restarts_than_workers_share_passes_and_a_run_repeats_exactly(world, ray_cluster, tmp_path):
    """3 restarts (NGOpt, CMA, OnePlusOne) on 2 actors: one actor evaluates two candidates per round in
    one call; restart 0 still gives the one-process objective, and a second run repeats the first."""
    local = one_process(world)
    kwargs = dict(ray_cluster=ray_cluster, workers=2, restarts=3, portfolio=["CMA", "OnePlusOne"])
    first = run(world, tmp_path / "a", **kwargs)
    again = run(world, tmp_path / "b", **kwargs)
    assert [o.plan.optimizer for o in first.restarts] == ["NGOpt", "CMA", "OnePlusOne"]
    assert first.restarts[0].objective == pytest.approx(local.recipe.objective, rel=1e-6, abs=1e-6)
    assert first.recipe.objective <= local.recipe.objective + 1e-6
    for x, y in zip(first.restarts, again.restarts):
        assert [e.objective for e in x.history] == [e.objective for e in y.history]
        assert [e.weights for e in x.history] == [e.weights for e in y.history]
    assert first.recipe.weights == again.recipe.weights


def test_explicit_asks_warn_and_share_forward_passes(world, ray_cluster, tmp_path):
    """3 asks at a time on 1 actor: each value is that candidate's objective, and asks warn."""
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.model import load_base_model
    from lorahub_ray.core.objective import FewShotObjective
    from lorahub_ray.io.examples import read_examples

    with pytest.warns(LoraHubWarning, match="trade quality for time"):
        result = run(world, tmp_path / "a", ray_cluster=ray_cluster, workers=1, asks=3)
    steps = result.restarts[0].history
    assert len(steps) == BUDGET and result.recipe.search["asks"] == 3
    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    examples = read_examples(str(world["examples"]))
    objective = FewShotObjective(LoraComposer(base, lr.load_modules([str(world["hub"])])), tok, examples.inputs,
                                 examples.outputs)
    assert [e.objective for e in steps] == pytest.approx([objective(e.weights) for e in steps], rel=1e-6, abs=1e-6)


def test_killed_actor_is_restarted_and_the_search_finishes(world, ray_cluster, tmp_path):
    import ray

    killed = []

    def kill_once(event):
        if event["evaluations"] == 3 and event["restart"] == 0 and not killed:
            actor = ray.get_actor(f"lorahub-evaluator-{event['run']}-0")
            ray.kill(actor, no_restart=False)
            killed.append(actor)

    result = run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=2, callback=kill_once)
    assert killed
    assert [len(o.history) for o in result.restarts] == [BUDGET, BUDGET]
    undisturbed = run(world, tmp_path / "whole", ray_cluster=ray_cluster, workers=2)
    assert result.recipe.weights == pytest.approx(undisturbed.recipe.weights, abs=1e-9)


def test_interrupted_run_resumes_without_repeating_evaluations(world, ray_cluster, tmp_path):
    out = tmp_path / "out"
    seen = []

    def interrupt(event):
        seen.append(event["evaluations"])
        if event["evaluations"] == 4 and event["restart"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # what a scheduler's stop does, without stopping pytest

    with pytest.raises(SearchInterrupted, match="--resume"):
        run(world, out, workers=2, callback=interrupt)
    assert not (out / "recipe.json").exists()
    assert (tmp_path / "out.search" / "restarts.json").exists()
    resumed = []
    result = lorahub_learning_ray(resume=out, progress=False, callback=lambda e: resumed.append(e["evaluations"]))
    assert min(resumed) == 5  # the round in which the stop came was finished and saved: no evaluation runs again
    for k in (0, 1):
        assert [r["step"] for r in history(out) if r["restart"] == k] == list(range(BUDGET))
    whole = run(world, tmp_path / "whole", workers=2)  # the same answer as an uninterrupted run
    assert result.recipe.weights == pytest.approx(whole.recipe.weights, abs=1e-9)
    assert [o.objective for o in result.restarts] == pytest.approx([o.objective for o in whole.restarts], abs=1e-9)


def test_restarts_on_module_subsets_pick_the_best_restart(world, ray_cluster, tmp_path):
    result = run(world, tmp_path / "out", workers=2, restarts=2, modules_per_restart=2, budget=6)
    assert len(result.restarts) == 2
    assert [o.plan.seed for o in result.restarts] == [42, 43]
    assert result.recipe.objective == min(o.objective for o in result.restarts)
    assert len(result.recipe.modules) == 2
    best = result.recipe.search["restarts"][result.best.restart]
    assert sorted(m["name"] for m in result.recipe.modules) == sorted(best["order"])
    rows = history(tmp_path / "out")
    assert sorted({r["restart"] for r in rows}) == [0, 1]
    assert all(len(r["weights"]) == 2 == len(r["modules"]) for r in rows)


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
    with pytest.raises(SearchFailed, match="only 0-dimensional arrays"):
        run(world, tmp_path / "out", workers=1, optimizer=CrashingOptimizer)
    assert not (tmp_path / "out" / "recipe.json").exists()


def test_cli_reports_impossible_resources_in_one_line(world, ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    result = CliRunner().invoke(app, ["search", "-m", str(world["base"]), "--modules", str(world["hub"]), "-e",
                                      str(world["examples"]), "-o", str(tmp_path / "out"), "--workers", "2",
                                      "--gpus-per-worker", "0.5"])
    assert result.exit_code == 2
    assert "GPU" in result.output and "Traceback" not in result.output


def test_s3_output_keeps_the_experiment_on_s3_and_resumes_from_there(world, ray_cluster, tmp_path):
    """``--output s3://...``: the run's state lives beside it on S3 (where a driver elsewhere reaches
    it), an interrupted run resumes from the S3 URI alone, and the output is uploaded with recipe.json
    last."""
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
        assert fs.exists("tune-runs/task.search/lorahub-run.json") and fs.exists("tune-runs/task.search/restarts.json")
        resumed = []
        result = lorahub_learning_ray(resume=out, progress=False, callback=lambda e: resumed.append(e["evaluations"]))
        assert resumed[0] > max(seen) - 1
        assert result.output == out
        files = {p.removeprefix("tune-runs/task/") for p in fs.find("tune-runs/task")}
        assert {"recipe.json", "history.parquet", "search.png", "adapter/adapter_model.safetensors"} <= files
        assert not any(f.startswith("model/") for f in files)  # no merged model unless asked
        fs.get("tune-runs/task", str(tmp_path / "down"), recursive=True)
        assert [r["step"] for r in history(tmp_path / "down")] == list(range(BUDGET))
        whole = run(world, tmp_path / "whole", workers=1)
        assert result.recipe.weights == pytest.approx(whole.recipe.weights, abs=1e-9)
        model, _ = lr.build_model(out)  # the recipe on S3 rebuilds the model of the adapter the search uploaded
        assert_same_weights(model, lr.load_model(out)[0])


def test_an_evaluator_that_cannot_start_fails_the_run_once_with_its_cause(world, ray_cluster, tmp_path):
    with pytest.raises(SearchFailed, match="an evaluator failed to start: .*(CUDA|cuda)"):
        run(world, tmp_path / "out", workers=1, device="cuda")  # a CPU-only cluster
    assert not (tmp_path / "out" / "recipe.json").exists()


def test_a_wrong_base_model_fails_before_ray_starts_anything(world, ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(lr.LoraHubError, match="no usable config.json"):
        run(world, tmp_path / "out", model=str(tmp_path / "empty"), workers=1)


def test_halving_stops_the_worse_restarts_at_rungs_and_never_restart_zero(world, ray_cluster, tmp_path):
    """Four restarts on module subsets under ``scheduler="asha"`` (synchronous halving, rungs at 3 and 6
    evaluations for a budget of 12): at each rung the worse half of the live restarts stops, by best
    objective so far, except restart 0. Deterministic: a second run stops the same ones."""
    budget = 12
    kwargs = dict(workers=2, restarts=4, modules_per_restart=2, budget=budget, scheduler="asha")
    result = run(world, tmp_path / "out", **kwargs)
    runs = result.recipe.search["restarts"]
    assert len(runs) == 4 and result.recipe.search["scheduler"] == "asha"
    assert runs[0]["finished"] and runs[0]["evaluations"] == budget
    stopped = [r for r in runs if not r["finished"]]
    assert stopped and all(r["evaluations"] in (3, 6) for r in stopped)
    assert all(r["evaluations"] == budget for r in runs if r["finished"])
    at_first_rung = sorted(result.restarts, key=lambda o: (min(e.objective for e in o.history[:3]), o.restart))
    assert all(o.finished or o.restart == 0 for o in at_first_rung[:2])  # the better half went on
    assert result.recipe.objective == min(r["objective"] for r in runs)
    assert len(history(tmp_path / "out")) == sum(r["evaluations"] for r in runs)
    again = run(world, tmp_path / "again", **kwargs)
    assert [r["evaluations"] for r in again.recipe.search["restarts"]] == [r["evaluations"] for r in runs]


def test_cli_shows_lorahub_rays_own_warning_in_one_line(world, ray_cluster, tmp_path):
    """The real command, in its own process: ``quiet_libraries`` silences the libraries' UserWarnings, but
    lorahub-ray's LoraHubWarning (a UserWarning too) still reaches the console, as one line."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        [sys.executable, "-m", "lorahub_ray", "search", "-m", str(world["base"]), "--modules", str(world["hub"]),
         "-e", str(world["examples"]), "-o", str(tmp_path / "out"), "--workers", "1", "--asks", "2",
         "--budget", "4", "--address", ray_cluster["address"]],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "trade quality for time" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("warning: asks=2: 2 candidates asked at once trade quality for time")
    assert lines[0].endswith("uses the workers without that cost")  # the whole message on that one line
    assert "LoraHubWarning" not in done.stderr and "settings.py" not in done.stderr  # not Python's format
    assert lr.Recipe.load(tmp_path / "out").search["asks"] == 2  # and the search ran to its end
