"""Preselection and the paper's protocol (many tasks) on Ray, on the session's Ray head: the Ray search
with ``preselect`` searches the modules the local screen picks; ``--tasks`` on Ray (RayRunner) gives each
task what ``lorahub_learning_ray`` gives it alone."""

import json

import pytest

import lorahub_ray as lr
from helpers import EXAMPLES, assert_same_weights, write_jsonl
from lorahub_ray.cluster.ray_search import lorahub_learning_ray

BUDGET = 6
OTHER = [{"input": f"first: {w}", "output": w[0]} for w in ["abc", "hello", "xy", "lora", "ray"]]


def test_ray_preselect_searches_the_k_modules_the_local_screen_picks(world, ray_cluster, tmp_path):
    local = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), budget=BUDGET,
                                preselect=2, progress=False)
    result = lorahub_learning_ray(str(world["base"]), [str(world["hub"])], str(world["examples"]),
                                  output=tmp_path / "out", workers=2, restarts=3, budget=BUDGET, preselect=2,
                                  address=ray_cluster["address"], progress=False)
    want, got = local.recipe.search["preselect"], result.recipe.search["preselect"]
    assert got["chosen"] == want["chosen"] and len(got["chosen"]) == 2 and got["k"] == 2
    assert list(got["scores"]) == list(want["scores"]) and len(got["scores"]) == 4
    assert list(got["scores"].values()) == pytest.approx(list(want["scores"].values()), rel=1e-5)
    restarts = result.recipe.search["restarts"]
    assert len(restarts) == 3 and all(sorted(r["order"]) == sorted(want["chosen"]) for r in restarts)
    assert restarts[0]["order"] == want["chosen"]  # restart 0 is the local search over the k best
    assert [m["name"] for m in result.recipe.modules] == want["chosen"]
    assert restarts[0]["objective"] == pytest.approx(local.recipe.objective, rel=1e-5)
    assert result.recipe.objective <= local.recipe.objective + 1e-6
    saved = json.loads((tmp_path / "out" / "recipe.json").read_text())["search"]["preselect"]
    assert saved["chosen"] == want["chosen"]
    with pytest.raises(lr.LoraHubError, match="preselect 5 is more than the hub's 4"):
        lorahub_learning_ray(str(world["base"]), [str(world["hub"])], str(world["examples"]),
                             output=tmp_path / "bad", preselect=5, address=ray_cluster["address"], progress=False)


def test_ray_tasks_give_each_task_what_the_ray_search_gives_it_alone(world, ray_cluster, tmp_path):
    from lorahub_ray.cluster.ray_tasks import lorahub_tasks_ray

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    files = {"reverse": write_jsonl(tasks / "reverse.jsonl", EXAMPLES), "first": write_jsonl(tasks / "first.jsonl", OTHER)}
    (tasks / "broken.jsonl").write_text(json.dumps({"input": "a"}) + "\n")
    out = tmp_path / "runs"
    summary = lorahub_tasks_ray(str(world["base"]), [str(world["hub"])], str(tasks), output=str(out), workers=2,
                                restarts=3, modules_per_restart=3, budget=BUDGET, seed=3,
                                address=ray_cluster["address"], progress=False)
    assert summary == json.loads((out / "summary.json").read_text())
    rows = {r["task"]: r for r in summary["tasks"]}
    assert rows["broken"]["status"] == "failed" and "broken.jsonl" in rows["broken"]["error"]
    assert not (out / "broken").exists()
    assert rows["first"]["status"] == "ok" and (out / "first" / "recipe.json").is_file()
    for name, file in list(files.items())[:1]:  # one task alone is the comparison; the other ran beside it
        alone = lorahub_learning_ray(str(world["base"]), [str(world["hub"])], str(file), output=tmp_path / name,
                                     workers=2, restarts=3, modules_per_restart=3, budget=BUDGET, seed=3,
                                     address=ray_cluster["address"], progress=False)
        row, recipe = rows[name], lr.Recipe.load(out / name)
        assert row["status"] == "ok" and row["restart"] == alone.best.restart
        assert row["objective"] == pytest.approx(alone.recipe.objective, rel=1e-6)
        assert row["restarts"] == pytest.approx([o.objective for o in alone.restarts], rel=1e-6)
        assert recipe.modules == alone.recipe.modules and len(recipe.modules) == 3
        assert recipe.weights == pytest.approx(alone.recipe.weights, abs=1e-6)
        assert recipe.search["backend"] == "tune" and recipe.search["task"] == name
        assert recipe.search["experiment"] == f"{out}.search/{name}"
        assert [r["order"] for r in recipe.search["restarts"]] == [r["order"] for r in alone.recipe.search["restarts"]]
        rebuilt, _ = lr.build_model(out / name)
        for (key, a), (_, b) in zip(rebuilt.state_dict().items(), alone.model.state_dict().items()):
            assert (a - b).abs().max() < 1e-5, key
        assert (out / name / "history.parquet").exists() and (out / name / "adapter" / "adapter_config.json").exists()
        assert not (out / name / "model").exists()  # no merged model unless asked
        assert_same_weights(rebuilt, lr.load_model(out / name)[0])  # the base with the task's adapter merged in
    assert rows["first"]["objective"] != rows["reverse"]["objective"]  # each task searched its own examples


def test_cli_tasks_with_preselect_on_ray(world, ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "reverse.jsonl", EXAMPLES)
    write_jsonl(tasks / "first.jsonl", OTHER)
    out = tmp_path / "runs"
    args = ["search", "-m", str(world["base"]), "--modules", str(world["hub"]), "--tasks", str(tasks), "-o", str(out),
            "--budget", "4", "--workers", "2", "--address", ray_cluster["address"], "--restarts", "3",
            "--preselect", "3", "--modules-per-restart", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["status"] for r in summary["tasks"]] == ["ok", "ok"] and summary["restarts"] == 3
    for row in summary["tasks"]:
        search = lr.Recipe.load(out / row["task"]).search
        chosen = search["preselect"]["chosen"]
        assert search["backend"] == "tune" and len(chosen) == 3 and len(search["preselect"]["scores"]) == 4
        assert len(search["restarts"]) == 3
        assert all(set(r["order"]) <= set(chosen) and len(r["order"]) == 2 for r in search["restarts"])
    refused = CliRunner().invoke(app, args[:-6] + ["--resume", str(out)])
    assert refused.exit_code == 2 and "--resume" in refused.output


def test_cli_one_task_with_preselect_on_ray(world, ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["search", "-m", str(world["base"]), "--modules", str(world["hub"]), "-e",
                                      str(world["examples"]), "-o", str(out), "--budget", "4", "--workers", "2",
                                      "--address", ray_cluster["address"], "--preselect", "2", "--merge"])
    assert result.exit_code == 0, result.output
    recipe = lr.Recipe.load(out)
    chosen = recipe.search["preselect"]["chosen"]
    assert len(chosen) == 2 and [m["name"] for m in recipe.modules] == chosen
    assert all(sorted(r["order"]) == sorted(chosen) for r in recipe.search["restarts"])
    # --merge: the merged model/ beside the adapter, and the two are one model
    from lorahub_ray.core.adapter import apply_adapter
    from lorahub_ray.core.model import load_base_model

    assert (out / "model" / "config.json").is_file()
    base, _, _ = load_base_model(str(world["base"]), device="cpu")
    assert_same_weights(lr.load_model(out)[0], apply_adapter(base, out / "adapter"))
