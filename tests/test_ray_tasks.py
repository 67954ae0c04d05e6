"""Preselection and the paper's protocol (many tasks) on Ray, on the session's Ray head: the Ray search
with ``preselect`` searches the modules the local screen picks; ``--tasks`` on Ray (RayRunner) gives each
task what ``lorahub_learning_ray`` gives it alone."""

import json

import pytest

import lorahub_ray as lr
from helpers import EXAMPLES, write_jsonl
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
