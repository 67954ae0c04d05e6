"""``--select cv`` with its folds on Ray actors (cluster/folds.py), on the session's Ray head: the
selection equals the one the sequential folds give, with and without preselection, and the CLI runs it."""

import json

import pytest
import torch
from typer.testing import CliRunner

import lorahub_ray as lr
from lorahub_ray.cli import app
from lorahub_ray.cluster.folds import RayFolds

BUDGET = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The actors run one torch thread each; so does the sequential side, for the same arithmetic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _selection(world, **options):
    result = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), budget=BUDGET,
                                 select="cv", progress=False, **options)
    return result, result.recipe.search["selection"]


def _same_selection(local: dict, ray: dict) -> None:
    assert ray["winner"] == local["winner"] and ray["folds"] == local["folds"]
    by_name = {row["name"]: row for row in local["candidates"]}
    assert [row["name"] for row in ray["candidates"]] == list(by_name)
    for row in ray["candidates"]:
        want = by_name[row["name"]]
        assert row["fold_losses"] == pytest.approx(want["fold_losses"], rel=1e-5)
        assert row["rank"] == want["rank"]
        for got_w, want_w in zip(row.get("fold_weights", []), want.get("fold_weights", [])):
            assert got_w == pytest.approx(want_w, abs=1e-6)
    assert ray["fold_warm_starts"] == local["fold_warm_starts"]


@pytest.mark.parametrize("preselect", [None, 2], ids=["whole-hub", "preselect-2"])
def test_folds_on_ray_give_the_sequential_selection(world, ray_cluster, preselect):
    local, want = _selection(world, preselect=preselect)
    folds = RayFolds(2, address=ray_cluster["address"])
    on_ray, got = _selection(world, preselect=preselect, map_folds=folds)
    _same_selection(want, got)
    assert on_ray.recipe.weights == pytest.approx(local.recipe.weights, abs=1e-6)
    assert on_ray.recipe.objective == pytest.approx(local.recipe.objective, rel=1e-5)
    assert [m["name"] for m in on_ray.recipe.modules] == [m["name"] for m in local.recipe.modules]
    backend = got["folds_backend"]
    assert backend["backend"] == "ray" and backend["workers"] == 2
    assert len({a["pid"] for a in backend["actors"]}) == 2  # two actors shared the five folds
    assert "folds_backend" not in want


def test_cli_select_cv_runs_its_folds_on_ray_and_refuses_the_search_options(world, ray_cluster, tmp_path):
    common = ["search", "--model", str(world["base"]), "--modules", str(world["hub"]), "--examples",
              str(world["examples"]), "--budget", str(BUDGET), "--select", "cv"]
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, common + ["--output", str(out), "--workers", "2", "--address",
                                               ray_cluster["address"]])
    assert result.exit_code == 0, result.output
    assert "selected" in result.output
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["search"]["selection"]["folds_backend"]["workers"] == 2
    _, want = _selection(world)
    _same_selection(want, recipe["search"]["selection"])
    refused = CliRunner().invoke(app, common + ["--output", str(tmp_path / "bad"), "--restarts", "3"])
    assert refused.exit_code == 2 and "--select cv does not take --restarts" in refused.output
    assert not (tmp_path / "bad").exists()


def test_ray_folds_refuse_bad_resources_before_starting_anything():
    with pytest.raises(lr.LoraHubError, match="workers must be at least 1"):
        RayFolds(0)
    with pytest.raises(lr.LoraHubError, match="cpus per worker must be > 0"):
        RayFolds(2, cpus_per_worker=0)


def test_map_folds_is_for_select_cv_only(world):
    with pytest.raises(lr.LoraHubError, match="apply to select='cv' only"):
        lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), budget=BUDGET,
                            map_folds=RayFolds(2), progress=False)
