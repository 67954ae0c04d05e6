"""The search on Ray Tune: a trial per restart over model-holding evaluator actors. Restart 0 equals the
one-process search, the winner is never worse, runs repeat exactly; Tune's experiment holds every
evaluation; fault tolerance (a killed evaluator, a killed trial), resume after an interruption and after a
killed driver, subsets, schedulers, resource checks and optimizer crashes. All on the session's Ray head
(2 CPUs)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nevergrad as ng
import numpy as np
import pyarrow.parquet as pq
import pytest

import lorahub_ray as lr
from lorahub_ray import progress
from helpers import assert_same_weights
from lorahub_ray.cluster.ray_search import ResourceError, SearchFailed, SearchInterrupted, lorahub_learning_ray
from lorahub_ray.core.portfolio import halving_rungs, halving_stops, plan_restarts
from lorahub_ray.errors import LoraHubWarning

BUDGET = 8
ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def undisturbed(world, ray_cluster, tmp_path_factory):
    """The plain W=2 run (seed 42, budget 8) that the disturbed runs below must reproduce."""
    return run(world, tmp_path_factory.mktemp("undisturbed") / "out", ray_cluster=ray_cluster, workers=2)


# --- the restart plan and the halving (no Ray) --------------------------------------------------


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


def test_halving_decides_a_rung_once_every_live_restart_reached_it_and_never_stops_restart_zero():
    assert halving_rungs(40) == [10, 20] and halving_rungs(12) == [3, 6] and halving_rungs(1) == []
    best = {0: [9] * 7, 1: [5, 5, 5, 1, 1, 1, 1], 2: [4] * 7, 3: [6, 6, 2, 2, 2, 2, 2], 4: [8] * 7}
    # rung 3 (budget 12) ranks 3 (2), 2 (4), 1 (5), 4 (8), 0 (9): 4 stops, 0 stays (the one-process search);
    # rung 6 among {0, 1, 2, 3} ranks 1 (1), 3 (2), 2 (4), 0 (9): 2 stops, 0 stays
    assert halving_stops(best, 12) == {4: 3, 2: 6}
    # a restart that has not reached a rung holds the decision back, whatever the others did
    assert halving_stops({**best, 3: [6, 6]}, 12) == {}
    assert halving_stops({**best, 3: [6, 6, 2, 2]}, 12) == {4: 3}
    assert halving_stops({0: [1], 1: [2]}, 4) == {1: 1}
    # arrival order does not matter: the same values give the same decisions
    assert halving_stops(dict(reversed(list(best.items()))), 12) == halving_stops(best, 12)


def test_candidates_of_different_restarts_share_one_call_and_get_their_own_objective(world):
    """An evaluator's call: candidates over different module subsets (canonical order) in one pass; each
    value is the candidate's objective alone (its other modules at 0, the regulariser on its own weights),
    and a single whole-hub candidate is exactly objective(w)."""
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
    # a candidate alone may run its layers merged (core/compose.py): float32 rounding apart, within 1e-5
    assert shared == pytest.approx(alone, rel=1e-5, abs=1e-5)
    assert objective.evaluate_subsets([candidates[0]], [subsets[0]]) == [objective(candidates[0])]
    assert alone[1] != pytest.approx(objective([0.0, 0.7, 0.0, -0.3]), abs=1e-6)  # the regulariser: own weights


# --- the portfolio as Tune trials ---------------------------------------------------------------


def test_each_restart_is_a_tune_trial_restart_zero_equals_one_process_and_the_winner_is_no_worse(
        world, ray_cluster, tmp_path):
    from ray import tune

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
    assert recipe.search["backend"] == "tune" and recipe.search["experiment"] == str(tmp_path / "out.search" / "search")
    runs = recipe.search["restarts"]
    assert [r["seed"] for r in runs] == [42, 43] and recipe.search["best_restart"] == result.best.restart
    assert runs[0]["order"] == [m.name for m in lr.load_modules([str(world["hub"])])]  # the given order
    assert sorted(runs[1]["order"]) == sorted(runs[0]["order"]) and runs[1]["order"] != runs[0]["order"]
    assert all(r["evaluations"] == BUDGET and r["algorithm"] not in ("", "NGOpt") for r in runs)
    # the contract: Tune's experiment lists one trial per restart, each with every evaluation reported
    analysis = tune.ExperimentAnalysis(recipe.search["experiment"])
    frames = analysis.trial_dataframes
    assert len(frames) == 2
    by_restart = {int(f["restart"].iloc[0]): f for f in frames.values()}
    for k, outcome in enumerate(result.restarts):
        assert list(by_restart[k]["step"]) == list(range(BUDGET))
        assert list(by_restart[k]["objective"]) == pytest.approx([e.objective for e in outcome.history], abs=1e-12)
    rows = history(tmp_path / "out")
    assert sorted({r["restart"] for r in rows}) == [0, 1]
    assert all([r["step"] for r in rows if r["restart"] == k] == list(range(BUDGET)) for k in (0, 1))
    assert sorted(e["evaluations"] for e in events if e["restart"] == 1) == list(range(1, BUDGET + 1))
    assert (tmp_path / "out" / "search.png").stat().st_size > 0
    model, tok = lr.build_model(tmp_path / "out")  # the recipe rebuilds the same model
    a, b = model.state_dict(), result.model.state_dict()
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-6) for k in a)


def test_more_restarts_than_workers_and_a_run_repeats_exactly(world, ray_cluster, tmp_path):
    """3 restarts (NGOpt, CMA, OnePlusOne) on 2 actors: restart 0 still gives the one-process objective, and
    a second run repeats the first, evaluation by evaluation, into the same recipe."""
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
    assert (first.recipe.weights, first.recipe.objective) == (again.recipe.weights, again.recipe.objective)


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


# --- fault tolerance and resume -----------------------------------------------------------------


def test_a_killed_evaluator_is_restarted_and_the_search_finishes_undisturbed(world, ray_cluster, tmp_path,
                                                                             undisturbed):
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
    assert result.recipe.weights == pytest.approx(undisturbed.recipe.weights, abs=1e-9)


def test_a_killed_trial_restarts_from_its_checkpoint_and_the_search_finishes_undisturbed(world, ray_cluster,
                                                                                        tmp_path, undisturbed):
    """Tune's FailureConfig: the trial's process is killed after its 4th evaluation; Tune starts it again
    from its last checkpoint, it replays its history into a fresh optimizer and goes on."""
    killed, seen = [], []

    def kill_once(event):
        seen.append((event["restart"], event["evaluations"]))
        if event["evaluations"] == 4 and event["restart"] == 1 and not killed:
            os.kill(event["pid"], signal.SIGKILL)
            killed.append(event["pid"])

    result = run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=2, callback=kill_once)
    assert killed
    assert [len(o.history) for o in result.restarts] == [BUDGET, BUDGET]
    assert [r["step"] for r in history(tmp_path / "out") if r["restart"] == 1] == list(range(BUDGET))
    assert result.recipe.weights == pytest.approx(undisturbed.recipe.weights, abs=1e-9)
    assert [o.objective for o in result.restarts] == pytest.approx([o.objective for o in undisturbed.restarts],
                                                                   abs=1e-9)


def test_an_interrupted_run_resumes_with_tune_and_ends_as_an_uninterrupted_one(world, ray_cluster, tmp_path,
                                                                               undisturbed):
    out = tmp_path / "out"

    def interrupt(event):
        if event["evaluations"] == 4 and event["restart"] == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # what Ctrl-C does (Tune saves the experiment), without pytest

    with pytest.raises(SearchInterrupted, match="--resume"):
        run(world, out, ray_cluster=ray_cluster, workers=2, callback=interrupt)
    assert not (out / "recipe.json").exists()
    assert (tmp_path / "out.search" / "lorahub-run.json").exists()
    resumed = []
    result = lorahub_learning_ray(resume=out, progress=False, address=ray_cluster["address"],
                                  callback=lambda e: resumed.append((e["restart"], e["evaluations"])))
    assert min(n for r, n in resumed if r == 1) > 1  # the interrupted trial went on from its checkpoint
    assert result.recipe.search["resumed"] == 1
    for k in (0, 1):
        assert [r["step"] for r in history(out) if r["restart"] == k] == list(range(BUDGET))
    assert result.recipe.weights == pytest.approx(undisturbed.recipe.weights, abs=1e-9)
    assert [o.objective for o in result.restarts] == pytest.approx([o.objective for o in undisturbed.restarts],
                                                                   abs=1e-9)


def _cli(*args, env=None):
    return [sys.executable, "-m", "lorahub_ray", "search", *args]


def test_a_driver_killed_mid_search_resumes_from_the_cli_to_the_same_weights_and_objective(world, ray_cluster,
                                                                                         tmp_path):
    """The contract: ``lorahub-ray search ... --workers W --output OUT`` killed with SIGKILL mid-search, then
    ``lorahub-ray search --resume OUT``, finishes with the weights and objective of an uninterrupted run."""
    budget = 30
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               TUNE_GLOBAL_CHECKPOINT_S="0.5")
    common = ["-m", str(world["base"]), "--modules", str(world["hub"]), "-e", str(world["examples"]),
              "--workers", "2", "--budget", str(budget), "--address", ray_cluster["address"]]
    out = tmp_path / "out"
    driver = subprocess.Popen(_cli(*common, "-o", str(out)), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    experiment = tmp_path / "out.search" / "search"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:  # once Tune has saved both trials past step 3
        trials = list(experiment.glob("run_restart_*"))
        saved = list(experiment.glob("experiment_state-*.json"))
        if saved and len(trials) == 2 and all(len(list(t.glob("checkpoint_*"))) >= 4 for t in trials):
            time.sleep(1.0)  # a snapshot that names some of those checkpoints
            break
        time.sleep(0.2)
    assert driver.poll() is None, driver.stderr.read()[-3000:]
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    assert not (out / "recipe.json").exists()
    done = subprocess.run(_cli("--resume", str(out), "--address", ray_cluster["address"]), cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    whole = run(world, tmp_path / "whole", ray_cluster=ray_cluster, workers=2, budget=budget)
    resumed = lr.Recipe.load(out)
    assert resumed.search["resumed"] == 1
    assert len(list(experiment.glob("run_restart_*"))) == 2  # Tune restored its two trials, it did not start anew
    assert resumed.weights == pytest.approx(whole.recipe.weights, abs=1e-9)
    assert resumed.objective == pytest.approx(whole.recipe.objective, abs=1e-12)
    assert len(history(out)) == 2 * budget


def test_s3_output_keeps_the_experiment_on_s3_and_resumes_from_there(world, ray_cluster, tmp_path):
    """``--output s3://...``: the run's state and Tune's experiment live beside it on S3 (where a driver
    elsewhere reaches them), an interrupted run resumes from the S3 URI alone, and the output is uploaded
    with recipe.json last."""
    from s3 import moto_server, s3fs_client

    with moto_server():
        fs = s3fs_client()
        fs.mkdir("tune-runs")  # moto keeps buckets per process: a name of this test's own
        out = "s3://tune-runs/task"

        def interrupt(event):
            if event["evaluations"] == 4:
                os.kill(os.getpid(), signal.SIGUSR1)

        with pytest.raises(SearchInterrupted, match="--resume s3://tune-runs/task"):
            run(world, out, ray_cluster=ray_cluster, workers=1, callback=interrupt)
        assert not fs.exists("tune-runs/task/recipe.json")
        assert fs.exists("tune-runs/task.search/lorahub-run.json")
        assert fs.glob("tune-runs/task.search/search/experiment_state-*.json")
        resumed = []
        result = lorahub_learning_ray(resume=out, progress=False, address=ray_cluster["address"],
                                      callback=lambda e: resumed.append(e["evaluations"]))
        assert resumed and min(resumed) > 1
        assert result.output == out and result.recipe.search["experiment"] == "s3://tune-runs/task.search/search"
        files = {p.removeprefix("tune-runs/task/") for p in fs.find("tune-runs/task")}
        assert {"recipe.json", "history.parquet", "search.png", "adapter/adapter_model.safetensors"} <= files
        assert not any(f.startswith("model/") for f in files)  # no merged model unless asked
        fs.get("tune-runs/task", str(tmp_path / "down"), recursive=True)
        assert [r["step"] for r in history(tmp_path / "down")] == list(range(BUDGET))
        whole = run(world, tmp_path / "whole", ray_cluster=ray_cluster, workers=1)
        assert result.recipe.weights == pytest.approx(whole.recipe.weights, abs=1e-9)
        model, _ = lr.build_model(out)  # the recipe on S3 rebuilds the model of the adapter the search uploaded
        assert_same_weights(model, lr.load_model(out)[0])


# --- subsets, schedulers, searchers -------------------------------------------------------------


def test_restarts_on_module_subsets_pick_the_best_restart(world, ray_cluster, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "PLAIN_INTERVAL", 0.0)  # a job's log (not a terminal): a line at every report
    result = run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=2, restarts=2, modules_per_restart=2,
                 budget=6, progress=True)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("search: ")]
    assert len(lines) > 2 and "12/12 evaluations (100%)" in lines[-1] and ", done, " in lines[-1]
    best_line = f"best {result.recipe.objective:.4f} (restart {result.best.restart}); restarts 0: 6/6 "
    assert best_line in lines[-1], lines[-1]
    assert [o.plan.seed for o in result.restarts] == [42, 43]
    assert result.recipe.objective == min(o.objective for o in result.restarts)
    assert len(result.recipe.modules) == 2
    best = result.recipe.search["restarts"][result.best.restart]
    assert sorted(m["name"] for m in result.recipe.modules) == sorted(best["order"])
    rows = history(tmp_path / "out")
    assert sorted({r["restart"] for r in rows}) == [0, 1]
    assert all(len(r["weights"]) == 2 == len(r["modules"]) for r in rows)


def test_halving_stops_the_worse_restarts_at_rungs_never_restart_zero_and_repeats(world, ray_cluster, tmp_path):
    """Four restarts on module subsets under ``scheduler="halving"`` (a Tune TrialScheduler; rungs at 3 and
    6 evaluations for a budget of 12): at each rung the worse half of the live restarts stops, by best
    objective so far, except restart 0. Deterministic: a second run stops the same ones."""
    budget = 12
    kwargs = dict(ray_cluster=ray_cluster, workers=2, restarts=4, modules_per_restart=2, budget=budget,
                  scheduler="halving")
    result = run(world, tmp_path / "out", **kwargs)
    runs = result.recipe.search["restarts"]
    assert len(runs) == 4 and result.recipe.search["scheduler"] == "halving"
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
    assert again.recipe.weights == result.recipe.weights


def test_tunes_asha_never_stops_restart_zero(world, ray_cluster, tmp_path):
    local = one_process(world, budget=12)
    result = run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=2, restarts=4, budget=12,
                 scheduler="asha")
    assert result.recipe.search["scheduler"] == "asha"
    zero = result.restarts[0]
    assert zero.finished and len(zero.history) == 12
    assert zero.objective == pytest.approx(local.recipe.objective, abs=1e-6)
    assert result.recipe.objective <= local.recipe.objective + 1e-6


@pytest.mark.parametrize("searcher", ["random", pytest.param("optuna", marks=pytest.mark.slow),
                                      pytest.param("hyperopt", marks=pytest.mark.slow), "nevergrad"])
def test_a_tune_searcher_runs_one_candidate_per_trial(world, ray_cluster, tmp_path, searcher):
    budget = 6
    result = run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=2, budget=budget, searcher=searcher,
                 seed=3)
    search = result.recipe.search
    assert search["backend"] == "tune" and search["searcher"] == searcher
    steps = result.restarts[0].history
    assert len(steps) == budget and steps[0].weights == [0.0] * 4  # the reference's start comes first
    assert result.recipe.objective == min(e.objective for e in steps)
    assert result.recipe.optimizer == f"tune:{searcher}"
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.model import load_base_model
    from lorahub_ray.io.examples import read_examples

    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    examples = read_examples(str(world["examples"]))
    objective = lr.FewShotObjective(LoraComposer(base, lr.load_modules([str(world["hub"])])), tok, examples.inputs,
                                    examples.outputs)
    assert objective(result.recipe.weights) == pytest.approx(result.recipe.objective, rel=1e-6, abs=1e-6)


def test_a_searcher_that_raises_fails_the_run_with_its_error_instead_of_hanging(world, ray_cluster, tmp_path):
    from ray.tune.search import Searcher

    class Broken(Searcher):
        def __init__(self):
            super().__init__(metric="objective", mode="min")
            self.asked = 0

        def set_search_properties(self, metric, mode, config, **spec):
            return True  # it takes Tune's param_space

        def suggest(self, trial_id):
            self.asked += 1
            if self.asked > 2:
                raise RuntimeError("the searcher broke")
            return {f"w{i}": 0.1 * self.asked for i in range(4)}

        def on_trial_complete(self, trial_id, result=None, error=False):
            pass

    with pytest.raises(SearchFailed, match="the searcher broke"):
        run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=1, budget=5, searcher=Broken())


# --- checks before anything starts --------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"gpus_per_worker": 1}, r"GPU"),
    ({"gpus_per_worker": 0.25, "workers": 8}, r"GPU"),
    ({"cpus_per_worker": 4}, r"CPUs"),
    ({"cpus_per_worker": 1}, r"trials"),  # 2 × 1 CPU leaves nothing for the trials: Tune would wait forever
    ({"scheduler": "hyperspace"}, r"unknown scheduler 'hyperspace'"),
    ({"searcher": "bayesian-magic"}, r"unknown searcher"),
    ({"callbacks": ["mlflow"]}, r"--callback mlflow needs the package 'mlflow'"),
    ({"searcher": "optuna", "scheduler": "asha"}, r"scheduler of restarts does not apply"),
])
def test_impossible_or_unknown_options_fail_before_anything_starts(world, ray_cluster, tmp_path, kwargs, message):
    kwargs.setdefault("workers", 2)
    with pytest.raises((ResourceError, lr.LoraHubError), match=message):
        run(world, tmp_path / "out", ray_cluster=ray_cluster, **kwargs)
    assert not (tmp_path / "out").exists()


class CrashingOptimizer(ng.optimizers.registry["NGOpt"]):
    """Raises inside ask() as nevergrad 1.0.12 does on numpy 2.4."""

    def _internal_ask_candidate(self):
        if self.num_ask >= 3:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return super()._internal_ask_candidate()


def test_crash_inside_the_optimizer_fails_the_run_with_its_error(world, ray_cluster, tmp_path):
    """The optimizer runs in the trials: a class of one's own must be importable there, as any Ray code; a test
    module is not, so it travels by value."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with pytest.raises(SearchFailed, match="only 0-dimensional arrays"):
        run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=1, optimizer=CrashingOptimizer,
            max_failures=0)
    assert not (tmp_path / "out" / "recipe.json").exists()


def test_cli_reports_impossible_resources_and_missing_packages_in_one_line(world, ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    common = ["search", "-m", str(world["base"]), "--modules", str(world["hub"]), "-e", str(world["examples"]),
              "-o", str(tmp_path / "out"), "--workers", "2"]
    result = CliRunner().invoke(app, [*common, "--gpus-per-worker", "0.5"])
    assert result.exit_code == 2
    assert "GPU" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, [*common, "--callback", "wandb"])
    assert result.exit_code == 2 and "pip install wandb" in result.output and "Traceback" not in result.output


def test_an_evaluator_that_cannot_start_fails_the_run_once_with_its_cause(world, ray_cluster, tmp_path):
    with pytest.raises(SearchFailed, match="an evaluator failed to start: .*(CUDA|cuda)"):
        run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=1, device="cuda")  # a CPU-only cluster
    assert not (tmp_path / "out" / "recipe.json").exists()


def test_a_wrong_base_model_fails_before_ray_starts_anything(world, ray_cluster, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(lr.LoraHubError, match="no usable config.json"):
        run(world, tmp_path / "out", model=str(tmp_path / "empty"), ray_cluster=ray_cluster, workers=1)


def test_tensorboard_callback_writes_event_files_in_the_experiment(world, ray_cluster, tmp_path):
    result = run(world, tmp_path / "out", ray_cluster=ray_cluster, workers=1, budget=3, callbacks=["tensorboard"])
    assert list(Path(result.experiment).glob("*/events.out.tfevents.*"))


def test_cli_shows_lorahub_rays_own_warning_in_one_line(world, ray_cluster, tmp_path):
    """The real command, in its own process: ``quiet_libraries`` silences the libraries' UserWarnings, but
    lorahub-ray's LoraHubWarning (a UserWarning too) still reaches the console, as one line; Tune's own
    console reporter stays quiet."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run(
        _cli("-m", str(world["base"]), "--modules", str(world["hub"]), "-e", str(world["examples"]), "-o",
             str(tmp_path / "out"), "--workers", "1", "--asks", "2", "--budget", "4", "--address",
             ray_cluster["address"]), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if "trade quality for time" in line]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("warning: asks=2: 2 candidates asked at once trade quality for time")
    assert lines[0].endswith("uses the workers without that cost")  # the whole message on that one line
    assert "LoraHubWarning" not in done.stderr and "settings.py" not in done.stderr  # not Python's format
    assert "Configuration for experiment" not in done.stdout + done.stderr  # Tune's reporter is off
    recipe = lr.Recipe.load(tmp_path / "out")
    assert recipe.search["asks"] == 2 and json.loads(json.dumps(recipe.search))["backend"] == "tune"


def test_a_tune_user_runs_the_restart_trainable_in_a_tuner_of_their_own(world, ray_cluster, tmp_path, undisturbed):
    """The Python API for Tune users: the evaluators, the trainable and its param_space in their own Tuner,
    with their own TuneConfig and RunConfig, give the restarts the search gives."""
    from ray import tune

    from lorahub_ray.cluster import tune as lorahub_tune
    from lorahub_ray.cluster.evaluators import Evaluators

    modules = lr.load_modules([str(world["hub"])])
    examples = lr.read_examples(str(world["examples"]))
    plans = plan_restarts(len(modules), 2, seed=42, optimizer="NGOpt")
    with Evaluators(str(world["base"]), modules, examples.inputs, examples.outputs, workers=2, cpus=0.5) as pool:
        pool.wait()
        spec = lorahub_tune.RestartSpec(plans, budget=BUDGET, optimizer="NGOpt", evaluators=pool.names)
        grid = tune.Tuner(lorahub_tune.restart_trainable(spec), param_space=lorahub_tune.restart_space(spec),
                          tune_config=tune.TuneConfig(metric="objective", mode="min", max_concurrent_trials=1),
                          run_config=tune.RunConfig(storage_path=str(tmp_path), name="mine", verbose=0)).fit()
    outcomes = lorahub_tune.restart_outcomes(grid, spec)
    assert [o.objective for o in outcomes] == pytest.approx([o.objective for o in undisturbed.restarts], abs=1e-9)
    frame = grid.get_dataframe()
    assert sorted(frame["config/restart"]) == [0, 1] and set(frame["evaluations"]) == {BUDGET}
    best = grid.get_best_result(metric="result_objective", mode="min")  # each trial's answer, in its last report
    assert best.metrics["result_objective"] == pytest.approx(min(o.objective for o in outcomes), abs=1e-12)
