"""Preselection (core/preselect.py) and the paper's protocol, many tasks in one run (core/protocol.py)."""

import json

import pyarrow.parquet as pq
import pytest
import torch
from transformers import T5ForConditionalGeneration
from typer.testing import CliRunner

import lorahub_ray as lr
from helpers import EXAMPLES, write_jsonl
from lorahub_ray.cli import app
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.modules import load_modules
from lorahub_ray.core.objective import FewShotObjective
from lorahub_ray.core.preselect import check_k, preselect, screen
from lorahub_ray.core.protocol import run_protocol
from lorahub_ray.errors import LoraHubError

INPUTS = [r["input"] for r in EXAMPLES]
OUTPUTS = [r["output"] for r in EXAMPLES]
OTHER = [{"input": f"first: {w}", "output": w[0]} for w in ["abc", "hello", "xy", "lora", "ray"]]


def objective_for(world):
    modules = load_modules([str(world["hub"])])
    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    return FewShotObjective(LoraComposer(base, modules), tok, INPUTS, OUTPUTS), modules


@pytest.mark.parametrize("chunk", [1, 3, 8])
def test_screen_scores_are_each_modules_one_hot_loss(world, chunk):
    objective, modules = objective_for(world)
    scores = screen(objective, len(modules), chunk=chunk)
    alone = [objective.loss([1.0 if j == i else 0.0 for j in range(len(modules))]) for i in range(len(modules))]
    assert scores == pytest.approx(alone, rel=1e-6, abs=1e-6)
    assert len(set(round(s, 6) for s in scores)) == len(modules)  # the modules really differ


def test_preselect_keeps_the_k_lowest_in_hub_order():
    assert preselect([3.0, 1.0, 2.0, 1.0, float("inf")], 2) == [1, 3]
    assert preselect([3.0, 1.0, 2.0, 1.0, float("inf")], 3) == [1, 2, 3]
    for bad in (0, -1, 6, 1.5, True):
        with pytest.raises(LoraHubError):
            preselect([3.0, 1.0, 2.0, 1.0, 0.0], bad)
    with pytest.raises(LoraHubError, match="more than the hub's 4"):
        check_k(5, 4)


def test_search_over_the_k_best_equals_the_search_over_them_directly_started_at_the_best(world, tmp_path):
    """The search over the k best is the search given those modules directly, started at weight 1 on the
    best-screened of them (not at 0): same evaluations, weights and merged model."""
    from lorahub_ray.core.search import minimize

    out = tmp_path / "pre"
    pre = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), output=out, budget=12,
                              preselect=2, progress=False)
    screened = pre.recipe.search["preselect"]
    objective, modules = objective_for(world)
    scores = screen(objective, len(modules))
    assert list(screened["scores"]) == [m.name for m in modules]
    assert list(screened["scores"].values()) == pytest.approx(scores, rel=1e-6)
    indices = preselect(scores, 2)
    chosen = [modules[i].name for i in indices]
    assert screened["chosen"] == chosen == [m["name"] for m in pre.recipe.modules] and screened["k"] == 2
    best = min(range(2), key=lambda j: (scores[indices[j]], j))
    assert screened["start"] == chosen[best]
    init = [float(j == best) for j in range(2)]
    assert list(pre.search.history[0].weights) == init  # the first point asked is the best module alone
    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    direct_modules = load_modules([str(world["hub"] / n) for n in chosen])
    composer = LoraComposer(base, direct_modules)
    direct = minimize(FewShotObjective(composer, tok, INPUTS, OUTPUTS), 2, budget=12, seed=42, init=init)
    assert pre.recipe.weights == pytest.approx(direct.weights, abs=1e-6)
    assert pre.recipe.objective == pytest.approx(direct.objective, rel=1e-6)
    assert [e.objective for e in pre.search.history] == pytest.approx([e.objective for e in direct.history], rel=1e-6)
    merged = composer.merge_and_unload(direct.weights)
    rebuilt, _ = lr.build_model(out)
    for (name, a), (_, b) in zip(rebuilt.state_dict().items(), merged.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


@pytest.mark.parametrize("k", [0, 5])
def test_a_bad_k_is_refused_before_any_model_loads(world, k):
    with pytest.raises(LoraHubError, match="preselect"):
        lr.lorahub_learning("/no/such/model", [str(world["hub"])], str(world["examples"]), preselect=k, progress=False)
    result = CliRunner().invoke(app, ["search", "-m", "/no/such/model", "--modules", str(world["hub"]), "-e",
                                      str(world["examples"]), "-o", "unused", "--preselect", str(k)])
    assert result.exit_code == 2 and "preselect" in result.output


@pytest.fixture
def task_dir(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_jsonl(tasks / "reverse.jsonl", EXAMPLES)
    write_jsonl(tasks / "first.jsonl", OTHER)
    (tasks / "broken.jsonl").write_text(json.dumps({"input": "a"}) + "\n" + json.dumps({"input": "b"}) + "\n")
    return tasks


def test_tasks_one_malformed_the_others_finish(world, task_dir, tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, ["search", "-m", str(world["base"]), "--modules", str(world["hub"]),
                                      "--tasks", str(task_dir), "-o", str(out), "--budget", "6", "--restarts", "3",
                                      "--modules-per-restart", "2", "--seed", "5", "--merge"])
    assert result.exit_code == 1, result.output
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["task"]: r for r in summary["tasks"]}
    assert sorted(rows) == ["broken", "first", "reverse"]
    assert summary["restarts"] == 3 and summary["modules_per_restart"] == 2 and summary["finished"]
    broken = rows["broken"]
    assert broken["status"] == "failed" and "broken.jsonl" in broken["error"] and "line 1" in broken["error"]
    assert not (out / "broken").exists() and "broken" in result.output
    for name in ("first", "reverse"):
        row = rows[name]
        assert row["status"] == "ok" and row["error"] is None and row["seconds"] > 0
        assert len(row["restarts"]) == 3 and row["objective"] == min(row["restarts"])
        assert row["restarts"][row["restart"]] == row["objective"] and row["seed"] == 5 + row["restart"]
        recipe = lr.Recipe.load(out / name)
        assert recipe.objective == row["objective"] and len(recipe.modules) == 2
        trials = recipe.search["trials"]
        assert [t["seed"] for t in trials] == [5, 6, 7] and recipe.search["winner"] == row["restart"]
        # the winner's modules, in hub order in the recipe (its search may have taken them permuted)
        hub_order = [m.name for m in lr.load_modules([str(world["hub"])])]
        assert [m["name"] for m in recipe.modules] == sorted(trials[row["restart"]]["modules"], key=hub_order.index)
        rebuilt, _ = lr.build_model(out / name)
        saved = T5ForConditionalGeneration.from_pretrained(out / name / "model")
        for (key, a), (_, b) in zip(rebuilt.state_dict().items(), saved.state_dict().items()):
            assert torch.allclose(a, b, atol=1e-6), key
        history = pq.read_table(out / name / "history.parquet").to_pydict()
        assert sorted(set(history["restart"])) == [0, 1, 2] and len(history["restart"]) == 18
    assert rows["first"]["objective"] != rows["reverse"]["objective"]  # each task searched its own examples


def test_one_restart_over_the_whole_hub_is_lorahub_learning(world, task_dir, tmp_path):
    files = [("reverse", str(task_dir / "reverse.jsonl"))]
    summary = run_protocol(str(world["base"]), [str(world["hub"])], files, output=str(tmp_path / "runs"), budget=10,
                           progress=False)
    alone = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(task_dir / "reverse.jsonl"), budget=10,
                                progress=False)
    recipe = lr.Recipe.load(tmp_path / "runs" / "reverse")
    assert summary["tasks"][0]["objective"] == alone.recipe.objective
    assert recipe.weights == alone.recipe.weights and recipe.modules == alone.recipe.modules


def test_tasks_with_preselect_draw_each_restart_from_the_k_best(world, task_dir, tmp_path):
    files = [("reverse", str(task_dir / "reverse.jsonl"))]
    run_protocol(str(world["base"]), [str(world["hub"])], files, output=str(tmp_path / "runs"), budget=4, restarts=3,
                 modules_per_restart=2, preselect=3, progress=False)
    search = lr.Recipe.load(tmp_path / "runs" / "reverse").search
    chosen = set(search["preselect"]["chosen"])
    assert len(chosen) == 3 and len(search["preselect"]["scores"]) == 4
    assert all(set(t["modules"]) <= chosen and len(t["modules"]) == 2 for t in search["trials"])


def test_tasks_refuse_bad_input_before_loading(world, task_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    files = [("reverse", str(task_dir / "reverse.jsonl"))]
    with pytest.raises(LoraHubError, match="refusing to overwrite"):
        run_protocol("/no/such/model", [str(world["hub"])], files, output=str(precious), progress=False)
    assert (precious / "notes.txt").read_text() == "mine"
    with pytest.raises(LoraHubError, match="two files for task 'reverse'"):
        run_protocol("/no/such/model", [str(world["hub"])], files + [("reverse", str(task_dir / "first.jsonl"))],
                     output=str(tmp_path / "x"), progress=False)
    with pytest.raises(LoraHubError, match="preselect"):
        run_protocol("/no/such/model", [str(world["hub"])], files, output=str(tmp_path / "x"), preselect=9,
                     progress=False)
    result = CliRunner().invoke(app, ["search", "-m", "/no/such/model", "--modules", str(world["hub"]), "--tasks",
                                      str(task_dir), "-o", str(tmp_path / "y"), "--scheduler", "asha"])
    assert result.exit_code == 2 and "--scheduler" in result.output


def test_large_hub_adds_distractors_and_leaves_the_default_alone(tmp_path):
    from safetensors.torch import load_file

    from lorahub_ray.demo.world import BuildConfig, LargeConfig, build_default_hub, build_large_hub
    from lorahub_ray.io.storage import sha256_dir

    tiny = BuildConfig(d_model=32, layers=1, batch_size=8, base_steps=4, lora_steps=2, test=20)
    default = build_default_hub(tmp_path, progress=False, config=tiny)
    before = sha256_dir(default.root)
    large = build_large_hub(tmp_path, progress=False, config=tiny, large=LargeConfig(distractors=3, lora_steps=2))
    assert build_default_hub(tmp_path, progress=False, config=tiny).root == default.root
    assert sha256_dir(default.root) == before and large.root != default.root
    assert sha256_dir(large.base_model) == sha256_dir(default.base_model)
    assert list(large.modules) == sorted(list(default.modules) + ["first", "second", "third"])
    assert large.unseen_tasks.keys() == default.unseen_tasks.keys()
    tensors = [load_file(p / "adapter_model.safetensors") for p in large.modules.values()]
    a_keys = [k for k in tensors[0] if "lora_A" in k]
    assert a_keys and all(t[k].equal(tensors[0][k]) for t in tensors for k in a_keys)  # one frozen A for all
    first = load_file(large.modules["first"] / "adapter_model.safetensors")
    assert not all(first[k].equal(t[k]) for t in tensors[:1] for k in first if "lora_B" in k)
    assert LargeConfig(distractors=4).digest(tiny) != LargeConfig(distractors=3).digest(tiny)


def test_restrict_holds_the_subset_alone_and_gives_the_hub_back(world):
    objective, modules = objective_for(world)
    composer = objective.composer
    with composer.restrict([2, 0]):
        assert [m.name for m in composer.modules] == [modules[2].name, modules[0].name]
        restricted = objective([0.7, -0.3])
        with pytest.raises(ValueError):
            objective([0.1] * len(modules))  # one weight per module of the subset, no more
    assert composer.num_modules == len(modules)
    full = [-0.3, 0.0, 0.7] + [0.0] * (len(modules) - 3)
    assert restricted == pytest.approx(objective(full) - 0.05 * 1.0 / len(modules) + 0.05 * 1.0 / 2, rel=1e-6)
    for bad in ([], [0, 0], [len(modules)]):
        with pytest.raises(ValueError):
            with composer.restrict(bad):
                pass


def test_restarts_over_a_preselection_start_at_their_best_module():
    from lorahub_ray.core.portfolio import plan_restarts

    ranking = [4, 1, 5, 2]  # a screen's chosen modules, best first
    plans = plan_restarts(6, 4, seed=0, optimizer="NGOpt", modules_per_restart=2, candidates=[1, 2, 4, 5],
                          start_ranking=ranking)
    for plan in plans:
        assert plan.start == next(m for m in ranking if m in plan.modules)
        assert plan.init() == [1.0 if m == plan.start else 0.0 for m in plan.modules]
        assert plan.to_json()["start"] == plan.start
    plain = plan_restarts(6, 2, seed=0, optimizer="NGOpt")
    assert all(p.start is None and p.init() is None for p in plain)  # without a preselection: from 0
