"""`lorahub-ray hub build` (one module per task source, reasoning-gym generators by default, scored on its
held-out split), option log-likelihood accuracy, and select cv under a chat template, on the tiny Llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import EXAMPLES, make_llama_base, make_llama_module

from lorahub_ray.cli import app
from lorahub_ray.errors import LoraHubError
from lorahub_ray.evaluation import hub_build
from lorahub_ray.io import catalogue, sources, storage

DATA = Path(__file__).parent / "data" / "bigbench"
INPUTS, OUTPUTS = [e["input"] for e in EXAMPLES], [e["output"] for e in EXAMPLES]
BIGBENCH_TASKS = [str(DATA / "tiny_reverse"), str(DATA / "tiny_first_letter")]
# two reasoning-gym generators, 14 examples each, one with its config passed through
TASKS = ["reasoning-gym:spell_backward?size=14&seed=3", "reasoning-gym:gcd?size=14&max_value=20"]
NAMES = ["spell_backward", "gcd-max_value=20"]


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory):
    return make_llama_base(tmp_path_factory.mktemp("llama") / "chat", chat=True)


@pytest.fixture(scope="module")
def built(chat_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("hub") / "hub"
    result = CliRunner().invoke(app, ["hub", "build", "-m", str(chat_base), "-o", str(out), "--tasks", ",".join(TASKS),
                                      "--steps", "3", "--test-size", "4", "--template", "chat"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_build_trains_one_module_per_task_hashed_into_the_catalogue(built):
    manifest = json.loads((built / "build.json").read_text())
    assert list(manifest["modules"]) == NAMES
    rows = {r["id"]: r for r in catalogue.read_catalogue(str(built / "catalogue.parquet"))}
    assert set(rows) == set(manifest["modules"])
    for name, entry in manifest["modules"].items():
        folder = built / "modules" / name
        assert (folder / "adapter_config.json").is_file()
        assert entry["sha256"] == rows[name]["sha256"] == storage.sha256_dir(folder)
        # 14 examples: a fifth (2) held out, below --test-size 4, the other 12 trained on
        assert rows[name]["task"] == name and (entry["train_examples"], entry["test_examples"]) == (12, 2)
        assert 0 <= entry["base_accuracy"] <= 100 and 0 <= entry["module_accuracy"] <= 100
    assert manifest["settings"]["template"] == "chat"


@pytest.mark.parametrize("task", TASKS + BIGBENCH_TASKS)
def test_the_training_split_and_the_held_out_split_are_disjoint(task):
    shots = sources.train_shots(task, train_size=1000, test_size=4)
    train = sources.load_split(sources.with_split(task, "fewshot", shots=shots, size=4))
    test = sources.load_split(sources.with_split(task, "test", shots=shots, size=4))
    assert len(test.inputs) == 2 and len(train.inputs) == shots == 12
    assert not set(train.inputs) & set(test.inputs)


def test_a_rerun_resumes_and_other_settings_are_refused(built, chat_base):
    stamp = {p: p.stat().st_mtime_ns for p in (built / "modules").glob("*/adapter_model.safetensors")}
    again = hub_build.build_hub(str(chat_base), built, tasks=TASKS, steps=3, test_size=4, template="chat", progress=False)
    assert list(again["modules"]) == NAMES
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # nothing trained again
    with pytest.raises(LoraHubError, match="other settings \\(steps\\)"):
        hub_build.build_hub(str(chat_base), built, tasks=TASKS, steps=4, test_size=4, template="chat", progress=False)


def test_bbh_data_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(LoraHubError, match="must not be trained on BBH data.*bbh:navigate \\(BBH itself\\), "
                                           "bigbench:date_understanding \\(the source of BBH's date_understanding\\)"):
        hub_build.build_hub(str(tmp_path / "no-model"), tmp_path / "hub",
                            tasks=[TASKS[0], "bbh:navigate", "bigbench:date_understanding"], progress=False)
    with pytest.raises(LoraHubError, match="'tasks/x.jsonl' is not a task source"):
        hub_build.build_hub(str(tmp_path / "no-model"), tmp_path / "hub", tasks=["tasks/x.jsonl"], progress=False)
    with pytest.raises(LoraHubError, match="refused the config of 'gcd'"):  # generated and checked first
        hub_build.build_hub(str(tmp_path / "no-model"), tmp_path / "hub", tasks=[TASKS[0], "reasoning-gym:gcd?x=1"],
                            progress=False)
    assert not (tmp_path / "hub").exists()


def test_the_upstream_hub_leaves_out_bbh_skills_and_the_transfer_suite():
    import reasoning_gym.factory

    from lorahub_ray.evaluation.bbh import TRANSFER_SUITE
    from lorahub_ray.io import bbh

    generators = {sources.parse_source(s).location.removeprefix("reasoning-gym:") for s in hub_build.UPSTREAM}
    assert len(generators) == len(hub_build.UPSTREAM) >= 24 and generators <= set(reasoning_gym.factory.DATASETS)
    hub_build.check_upstream(hub_build.UPSTREAM)
    assert set(hub_build.BBH_OVERLAP) <= set(reasoning_gym.factory.DATASETS)
    assert {t for tasks in hub_build.BBH_OVERLAP.values() for t in tasks} <= set(bbh.TASKS)
    assert not generators & set(hub_build.BBH_OVERLAP)  # e.g. word_sorting, against BBH's word_sorting
    assert hub_build.BBH_OVERLAP["word_sorting"] == ("word_sorting",)
    names = {sources.task_name(s) for s in hub_build.UPSTREAM}
    for source in TRANSFER_SUITE:  # a held-out generator, or a config of a hub task that the hub does not hold
        assert sources.task_name(source) not in names
        generator = sources.parse_source(source).location.removeprefix("reasoning-gym:")
        assert generator not in generators or sources.parse_source(source).params


def test_no_transfer_test_example_is_in_the_upstream_training_data():
    """The transfer suite's test questions never appear among the hub's training examples."""
    from lorahub_ray.evaluation.bbh import TRANSFER_SUITE

    seen = set()
    for source in hub_build.UPSTREAM:
        shots = sources.train_shots(source, train_size=1000, test_size=100)
        seen |= set(sources.load_split(sources.with_split(source, "fewshot", shots=shots)).inputs)
    for source in TRANSFER_SUITE:
        test = sources.load_split(sources.with_split(source, "test"))
        assert len(test.inputs) >= 80 and not seen & set(test.inputs), source


# --- option log-likelihood accuracy ------------------------------------------------------------------


def test_answer_options_come_from_the_last_options_list():
    from lorahub_ray.evaluation.options import answer_options, answer_sets

    prompt = "Q: x?\nOptions:\n(A) one\n(B) two\nA: (B)\n\nQ: y?\nOptions:\n(A) red\n(B) blue\n(C) green"
    assert answer_options(prompt) == ["(A)", "(B)", "(C)"]
    assert answer_options("Is it valid?\nOptions:\n- valid \n- invalid") == ["valid", "invalid"]  # BBH's dashes
    assert answer_options("What is 2 plus 2?") == []
    # an example's options, else the examples' distinct targets when they repeat, else none
    inputs = ["a\nOptions:\n- Yes\n- No", "b", "c", "d", "e"]
    assert answer_sets(inputs, ["No", "yes", "no", "yes", "yes"]) == [("Yes", "No")] + [("yes", "no")] * 4
    assert answer_sets(inputs[1:], ["8", "12", "8", "5"]) == [None] * 4  # 3 numbers among 4: not a closed set
    assert answer_sets(inputs[1:], ["yes"] * 4) == [None] * 4  # one answer: no choice to score


def test_option_scores_are_the_log_likelihood_of_each_answer(chat_base):
    from lorahub_ray.core.families import family_of_model
    from lorahub_ray.core.model import load_model
    from lorahub_ray.evaluation.options import option_accuracy, option_log_likelihoods

    model, tok = load_model(str(chat_base))
    inputs = ["Pick one.\nOptions:\n(A) a\n(B) b", "Which?\nOptions:\n(A) x\n(B) y\n(C) z", "no options here",
              "Go?\nOptions:\n- Yes\n- No"]
    scores = option_log_likelihoods(model, tok, inputs, template="chat", batch_size=2)
    assert [len(s) for s in scores] == [2, 3, 0, 2]
    family = family_of_model(model)
    with torch.no_grad():
        for text, row, answers in zip(inputs, scores, [["(A)", "(B)"], ["(A)", "(B)", "(C)"], [], ["Yes", "No"]]):
            for answer, score in zip(answers, row):  # one sequence at a time, no padding: the same sum
                ids, labels = family.sequences(tok, [text], [answer], template="chat")[0]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
                want = sum(logp[t - 1, y] for t, y in enumerate(labels) if y != -100 and t > 0)
                assert score == pytest.approx(float(want), abs=1e-4)
    result = option_accuracy(model, tok, inputs, ["(B)", "(C)", "x", "No"], template="chat")
    best = ["(" + "ABC"[max(range(len(s)), key=s.__getitem__)] + ")" for s in scores[:2]]
    best.append(["Yes", "No"][max(range(2), key=scores[3].__getitem__)])
    assert result["predictions"] == best[:2] + [None] + best[2:] and result["examples"] == 3
    assert result["accuracy"] == pytest.approx(100 / 3 * ((best[0] == "(B)") + (best[1] == "(C)") + (best[2] == "No")))
    assert option_accuracy(model, tok, ["a", "b"], ["x", "y"]) is None


# --- select cv renders with the template -------------------------------------------------------------


def test_select_cv_scores_folds_with_the_recipes_template(chat_base, tmp_path):
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.model import load_base_model
    from lorahub_ray.core.modules import load_module
    from lorahub_ray.core.objective import FewShotObjective
    from lorahub_ray.core.selection import SelectionConfig, SelectionContext

    paths = [make_llama_module(chat_base, tmp_path / n, seed=i) for i, n in enumerate(["a", "b"])]
    base, tok, _ = load_base_model(str(chat_base))
    composer = LoraComposer(base, [load_module(str(p), p.name) for p in paths])
    held = {}
    for template in ("plain", "chat"):
        context = SelectionContext(composer, tok, INPUTS, OUTPUTS, names=["a", "b"], budget=2,
                                   config=SelectionConfig(warm_starts=0), template=template)
        held[template] = context.scored({"single:a": [1.0, 0.0]}, [0, 1])[0]
        direct = FewShotObjective(composer, tok, INPUTS[:2], OUTPUTS[:2], loss="mean", template=template)
        assert held[template]["single:a"] == pytest.approx(float(direct.losses([[1.0, 0.0]])[0]))
    assert held["plain"]["single:a"] != pytest.approx(held["chat"]["single:a"])


def test_tasks_in_one_process_render_with_the_template_and_plan_the_ray_runners_restarts(chat_base, tmp_path):
    """``search --tasks`` without Ray: the chat template reaches the objective and the recipe, and
    the restarts are the portfolio's plans (restart 1 in its permuted order), as on Ray."""
    import lorahub_ray as lr
    from lorahub_ray.core.portfolio import plan_restarts

    hub = tmp_path / "hub"
    for i, n in enumerate(["a", "b", "c"]):
        make_llama_module(chat_base, hub / n, seed=i)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rev.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "out"
    summary = lr.lorahub_tasks(str(chat_base), [str(hub)], str(tasks), output=str(out), budget=3, restarts=2,
                               template="chat", progress=False)
    assert [(r["task"], r["status"]) for r in summary["tasks"]] == [("rev", "ok")]
    assert summary["template"] == "chat"
    recipe = json.loads((out / "rev" / "recipe.json").read_text())
    assert recipe["template"] == "chat"
    alone = lr.lorahub_learning(str(chat_base), [str(hub)], str(tasks / "rev.jsonl"), budget=3, template="chat",
                                progress=False)
    trials = recipe["search"]["trials"]
    assert trials[0]["objective"] == pytest.approx(alone.recipe.objective, rel=1e-6)  # restart 0: the search itself
    names = sorted(p.name for p in hub.iterdir())
    plans = plan_restarts(3, 2, seed=42, optimizer="NGOpt")
    assert [t["modules"] for t in trials] == [[names[i] for i in p.modules] for p in plans]


def test_hub_build_help_names_the_default_upstream():
    result = CliRunner().invoke(app, ["hub", "build", "--help"])
    assert result.exit_code == 0, result.output
    assert "reasoning-gym" in result.output and "--tasks" in result.output
