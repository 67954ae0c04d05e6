"""Cross-validated selection (``select="cv"``, core/selection.py) on tiny offline models."""

from __future__ import annotations

import json

import math

import pytest
import torch

import lorahub_ray as lr
from helpers import EXAMPLES, make_module, write_jsonl
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.objective import reference_loss
from lorahub_ray.core.selection import (SelectionConfig, SelectionContext, choose, fold_tasks, make_folds, select,
                                       sequential)
from lorahub_ray.core.selection_rules import rank_keys, reason, standard_error

MORE = [{"input": "reverse: moto", "output": "otom"}, {"input": "reverse: peft", "output": "tfep"}]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """On a shared CPU a second torch thread waiting for a busy core makes these small passes ~30x slower
    (measured here: 1.9 s instead of 56 ms per objective call of the tiny T5)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_folds_are_leave_one_out_up_to_five_examples_then_five_fold():
    assert make_folds(5) == [[0], [1], [2], [3], [4]]
    assert make_folds(2) == [[0], [1]]
    folds = make_folds(12)
    assert len(folds) == 5 and sorted(i for f in folds for i in f) == list(range(12))
    assert all(2 <= len(f) <= 3 for f in folds)
    with pytest.raises(lr.LoraHubError, match="at least 2"):
        make_folds(1)


def _context(world, rows, loss, **options):
    model, tok, _ = load_base_model(str(world["base"]), device="cpu")
    modules = lr.load_modules([str(world["hub"])])
    composer = LoraComposer(model, modules)
    return SelectionContext(composer, tok, [r["input"] for r in rows], [r["output"] for r in rows],
                            names=[m.name for m in modules], loss=loss, **options), tok


@pytest.mark.parametrize("rows", [EXAMPLES, EXAMPLES + MORE], ids=["leave-one-out", "k-fold"])
def test_a_fold_never_fits_on_its_held_out_examples(world, rows):
    """Every forward pass of a fit (the warm-start ranking and the searches) goes through the loss, which
    records the inputs it sees: within a fold they are exactly the fold's fit examples, never a held-out one."""
    seen: list[tuple[str, int | None, str]] = []  # (phase, fold, input)
    current = {"fold": None, "phase": "refit"}
    tok_holder = {}

    def recording_loss(model, batches):
        for b in batches:
            for text in tok_holder["tok"].batch_decode(b["input_ids"], skip_special_tokens=True):
                seen.append((current["phase"], current["fold"], text))
        return reference_loss(model, batches)

    def map_folds(context, tasks):
        results = []
        for task in tasks:
            current.update(fold=task.fold, phase="fold")
            results.append(context.run_fold(task))
        current.update(fold=None, phase="refit")
        return results

    context, tok = _context(world, rows, recording_loss, budget=5, config=SelectionConfig(warm_starts=1))
    tok_holder["tok"] = tok
    selection = select(context, map_folds=map_folds)
    folds = selection.report["folds"]
    assert folds == make_folds(len(rows))
    inputs = [r["input"] for r in rows]
    for f, held_out in enumerate(folds):
        fitted = {text for phase, fold, text in seen if phase == "fold" and fold == f}
        assert fitted == {inputs[i] for i in range(len(rows)) if i not in held_out}
        assert not fitted & {inputs[i] for i in held_out}
    # the planted example is fitted on by every fold but its own
    planted = inputs[-1]
    assert {fold for phase, fold, text in seen if text == planted and phase == "fold"} == set(range(len(folds))) - {
        next(f for f, h in enumerate(folds) if len(rows) - 1 in h)}


def _train_solver(base, path, rows, steps=60):
    """A LoRA trained briefly on the task's examples with PEFT: the module that solves the task."""
    from peft import LoraConfig, get_peft_model
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    model = get_peft_model(T5ForConditionalGeneration.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    batch = tok([r["input"] for r in rows], padding=True, return_tensors="pt")
    labels = tok([r["output"] for r in rows], padding=True, return_tensors="pt").input_ids
    labels[labels == tok.pad_token_id] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path)
    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = "tests/tiny-t5"
    cfg_file.write_text(json.dumps(cfg))
    return float(loss.detach())


@pytest.fixture(scope="module")
def planted(world, tmp_path_factory):
    """A hub where one module ("solver", trained on the task) solves it and three random ones are noise."""
    root = tmp_path_factory.mktemp("planted")
    hub = root / "hub"
    for i, name in enumerate(["noise-a", "noise-b", "noise-c"]):
        make_module(world["base"], hub / name, seed=10 + i, scale=0.5)
    _train_solver(world["base"], hub / "solver", EXAMPLES)
    return {"hub": hub, "examples": write_jsonl(root / "fewshot.jsonl", EXAMPLES)}


def test_cv_picks_the_solving_module_and_the_recipe_rebuilds_it(world, planted, tmp_path):
    out = tmp_path / "out"
    result = lr.lorahub_learning(str(world["base"]), [str(planted["hub"])], str(planted["examples"]), output=out,
                                 budget=8, select="cv", progress=False)
    names = [m["name"] for m in result.recipe.modules]
    solver = names.index("solver")
    w = result.recipe.weights
    assert abs(w[solver]) > sum(abs(x) for i, x in enumerate(w) if i != solver)  # the solver or dominated by it
    selection = result.recipe.search["selection"]
    table = {c["name"]: c for c in selection["candidates"]}
    assert table[selection["winner"]]["rank"] == 1 and selection["winner"] in selection["reason"]
    assert table[selection["winner"]]["cv_loss"] < table["base"]["cv_loss"]
    assert table["single:solver"]["cv_loss"] < min(table[f"single:noise-{c}"]["cv_loss"] for c in "abc")
    # the candidate table is complete: every candidate, one score per fold, a full ranking
    expected = {"base", "lorahub", "from-best-1", "from-best-2"} | {f"single:{n}" for n in names}
    assert set(table) == expected and len(selection["candidates"]) == len(expected)
    assert sorted(c["rank"] for c in table.values()) == list(range(1, len(expected) + 1))
    assert selection["folds"] == [[i] for i in range(5)] and selection["scheme"] == "leave-one-out"
    for c in table.values():
        assert len(c["fold_losses"]) == 5 and c["cv_loss"] == pytest.approx(sum(c["fold_losses"]) / 5)
        if c["kind"] == "search":
            assert len(c["fold_weights"]) == 5 and all(len(fw) == len(names) for fw in c["fold_weights"])
    # the warm starts of every fold were ranked on its fit examples: the solver is the best single in each
    assert [ws[0] for ws in selection["fold_warm_starts"]] == ["solver"] * 5
    assert selection["cost"]["fold_searches"] == 3 * 5
    # the saved recipe rebuilds the winner exactly
    saved = lr.Recipe.load(out)
    assert saved.weights == w and saved.search["selection"]["winner"] == selection["winner"]
    rebuilt, _ = lr.build_model(out)
    merged = result.model.state_dict()
    assert all(torch.equal(t, merged[k]) for k, t in rebuilt.state_dict().items())
    if selection["winner"].startswith("single:"):
        assert w == [1.0 if i == solver else 0.0 for i in range(len(names))] and saved.algorithm == "fixed"


def test_generate_score_counts_exact_matches_on_held_out_examples(world, planted):
    context, _ = _context({"base": world["base"], "hub": planted["hub"]}, EXAMPLES, "reference", budget=4,
                          config=SelectionConfig(score="generate", warm_starts=0, max_new_tokens=8))
    selection = select(context)
    table = {c["name"]: c for c in selection.report["candidates"]}
    for c in table.values():
        assert all(v in (0, 1) for v in c["fold_correct"]) and c["cv_accuracy"] == 20.0 * sum(c["fold_correct"])
    # the base model of a random tiny T5 reverses nothing; the module trained on the task does better
    assert table["base"]["cv_accuracy"] == 0.0
    winner = table[selection.winner]
    assert winner["rank"] == 1 and all(winner["cv_accuracy"] >= c["cv_accuracy"] for c in table.values())
    assert "exact match" in selection.report["reason"]


def _row(name: str, kind: str, losses: list[float]) -> dict:
    return {"name": name, "kind": kind, "fold_losses": losses, "cv_loss": sum(losses) / len(losses),
            "cv_loss_se": standard_error(losses)}


def _winner(config: SelectionConfig, rows: list[dict]) -> str:
    keys, threshold = rank_keys(config, rows)
    ranked = [r for _, r in sorted(zip(keys, rows), key=lambda kr: kr[0])]
    assert ranked[0]["name"] in reason(config, ranked, 5, threshold)
    return ranked[0]["name"]


def test_the_one_se_rule_prefers_the_simpler_candidate_within_the_noise():
    """A search whose mean held-out loss beats the best single module by less than one standard error loses to it
    under 'one-se' and wins under 'min'; one that beats it by more wins under both; the base model, simplest of all,
    wins whenever it is within the noise; an infinite fold loss never wins."""
    noisy = [0.2, 1.8, 0.3, 1.6, 0.4]  # mean 0.86, standard error 0.35
    rows = [_row("base", "base", [3.0] * 5), _row("single:a", "single", [1.0] * 5),
            _row("single:b", "single", [1.1] * 5), _row("lorahub", "search", noisy)]
    assert standard_error(noisy) == pytest.approx(0.3458, abs=1e-4)
    assert _winner(SelectionConfig(rule="one-se"), rows) == "single:a"
    assert _winner(SelectionConfig(rule="min"), rows) == "lorahub"
    clear = rows[:3] + [_row("lorahub", "search", [0.5, 0.52, 0.48, 0.5, 0.5])]  # far below, with little spread
    assert _winner(SelectionConfig(rule="one-se"), clear) == "lorahub" == _winner(SelectionConfig(rule="min"), clear)
    near_base = [_row("base", "base", [1.0] * 5)] + rows[1:]
    assert _winner(SelectionConfig(rule="one-se"), near_base) == "base"
    broken = rows[:3] + [_row("lorahub", "search", [0.1, 0.1, float("inf"), 0.1, 0.1])]
    assert _winner(SelectionConfig(rule="one-se"), broken) == "single:a"
    with pytest.raises(lr.LoraHubError, match="unknown selection rule 'median'"):
        SelectionConfig(rule="median").check()


def test_the_paired_rule_keeps_the_reference_search_unless_a_candidate_beats_it_fold_by_fold():
    """Under 'paired', a module alone whose mean held-out loss is lower than the reference search's by less than the
    noise of the fold-by-fold differences (what a module answering one thing to everything does, right on some folds
    and wrong on others) loses to it; one that is lower on every fold by a steady margin wins, as does a search that
    is; among those that beat it, the lowest loss; an infinite fold loss never beats it and a broken reference
    search is beaten by any finite candidate."""
    lorahub = [0.5, 0.5, 0.6, 0.4, 0.5]
    constant = [0.1, 0.1, 0.1, 1.2, 0.4]  # mean 0.38 < 0.5, but the differences swing: 0.4, 0.4, 0.5, -0.8, 0.1
    rows = [_row("base", "base", [3.0] * 5), _row("single:yes", "single", constant),
            _row("lorahub", "search", lorahub), _row("from-best-1", "search", [0.6] * 5)]
    paired = SelectionConfig(rule="paired")
    assert _winner(paired, rows) == "lorahub"
    assert _winner(SelectionConfig(rule="min"), rows) == "single:yes" == _winner(SelectionConfig(rule="one-se"), rows)
    assert _winner(SelectionConfig(), rows) == "lorahub"  # the default rule
    steady = rows[:3] + [_row("from-best-1", "search", [v - 0.1 for v in lorahub])]
    assert _winner(paired, steady) == "from-best-1"
    both = steady + [_row("single:skill", "single", [v - 0.2 + 0.01 * i for i, v in enumerate(lorahub)])]
    assert _winner(paired, both) == "single:skill"  # both beat it: the lower loss wins
    broken = rows[:2] + [_row("lorahub", "search", [0.5, math.inf, 0.5, 0.5, 0.5]), rows[3]]
    assert _winner(paired, broken) == "single:yes"  # every finite candidate beats it: the lowest loss
    infinite = [rows[0], _row("single:bad", "single", [0.0, 0.0, 0.0, 0.0, math.inf]), rows[2]]
    assert _winner(paired, infinite) == "lorahub"


def test_stronger_l1_is_a_candidate_setting(world):
    context, _ = _context(world, EXAMPLES, "reference", budget=3, config=SelectionConfig(warm_starts=1, l1=(0.5,)))
    assert [(s.name, s.start, s.l1) for s in context.settings] == [
        ("lorahub", 0, None), ("from-best-1", 1, None), ("lorahub l1=0.5", 0, 0.5), ("from-best-1 l1=0.5", 1, 0.5)]
    selection = select(context, map_folds=sequential)
    assert {c["name"] for c in selection.report["candidates"]} >= {"lorahub l1=0.5", "from-best-1 l1=0.5"}
    assert selection.report["cost"]["fold_searches"] == 4 * 5


def test_bad_select_options_fail_before_loading_anything(world, tmp_path):
    common = dict(budget=2, progress=False)
    with pytest.raises(lr.LoraHubError, match="unknown select 'best'"):
        lr.lorahub_learning("missing-model", ["missing-module"], str(world["examples"]), select="best", **common)
    with pytest.raises(lr.LoraHubError, match="unknown score 'bleu'"):
        lr.lorahub_learning("missing-model", ["missing-module"], str(world["examples"]), select="cv", score="bleu",
                            **common)
    with pytest.raises(lr.LoraHubError, match="select='cv' only"):
        lr.lorahub_learning("missing-model", ["missing-module"], str(world["examples"]), score="generate", **common)
    one = write_jsonl(tmp_path / "one.jsonl", EXAMPLES[:1])
    with pytest.raises(lr.LoraHubError, match="at least 2 few-shot examples"):
        lr.lorahub_learning("missing-model", ["missing-module"], str(one), select="cv", **common)


def test_cli_search_select_cv(world, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["search", "--model", str(world["base"]), "--modules", str(world["hub"]),
                                      "--examples", str(world["examples"]), "--output", str(out), "--budget", "3",
                                      "--select", "cv"])
    assert result.exit_code == 0, result.output
    recipe = lr.Recipe.load(out)
    assert recipe.search["selection"]["winner"] in result.output
    assert recipe.search["selection"]["rule"] == "paired" == recipe.search["selection"]["config"]["rule"]
    assert "fold by fold" in recipe.search["selection"]["reason"]
    assert all("paired_gain" in c for c in recipe.search["selection"]["candidates"])
    lowest = CliRunner().invoke(app, ["search", "--model", str(world["base"]), "--modules", str(world["hub"]),
                                      "--examples", str(world["examples"]), "--output", str(tmp_path / "min"),
                                      "--budget", "3", "--select", "cv", "--select-rule", "min"])
    assert lowest.exit_code == 0, lowest.output
    by_min = lr.Recipe.load(tmp_path / "min").search["selection"]
    assert by_min["rule"] == "min" and by_min["loss_threshold"] is None
    assert by_min["winner"] == min(by_min["candidates"], key=lambda c: c["cv_loss"])["name"]
    one_se = CliRunner().invoke(app, ["search", "--model", str(world["base"]), "--modules", str(world["hub"]),
                                      "--examples", str(world["examples"]), "--output", str(tmp_path / "one-se"),
                                      "--budget", "3", "--select", "cv", "--select-rule", "one-se"])
    assert one_se.exit_code == 0, one_se.output
    by_se = lr.Recipe.load(tmp_path / "one-se").search["selection"]
    assert by_se["rule"] == "one-se" and by_se["loss_threshold"] is not None and "standard error" in by_se["reason"]
    refused = CliRunner().invoke(app, ["search", "--model", "m", "--modules", "x", "--examples", str(world["examples"]),
                                       "--output", str(tmp_path / "never"), "--select", "cv", "--restarts", "2"])
    assert refused.exit_code == 2 and "--select cv does not take --restarts" in refused.output  # before any loading


def test_a_warm_start_is_the_first_point_asked_and_must_lie_in_bounds():
    from lorahub_ray.core.search import make_optimizer

    opt = make_optimizer("NGOpt", 3, budget=5, seed=42, init=[0.0, 1.0, 0.0])
    assert opt.ask().value.tolist() == [0.0, 1.0, 0.0]
    assert make_optimizer("NGOpt", 2, budget=5, seed=42).ask().value.tolist() == [0.0, 0.0]
    with pytest.raises(lr.LoraHubError, match="init must be 3 weights"):
        make_optimizer("NGOpt", 3, budget=5, seed=42, init=[0.0, 2.0, 0.0])


YES_NO = [{"input": f"is {n} even?", "output": "yes" if n % 2 == 0 else "no"} for n in (2, 3, 5, 8, 7)]


def test_an_example_with_an_answer_set_is_scored_by_its_right_answer_among_them(world):
    """A yes/no example's held-out loss is -log P(right answer) / Σ P(answer) over its answer set, each answer's
    probability that of its whole sequence; the form shared by the answers cancels out. Without an answer set
    (or with answers=False) it stays the token-mean cross-entropy."""
    from lorahub_ray.core.objective import FewShotObjective, token_losses

    context, tok = _context(world, YES_NO, "reference", budget=2, config=SelectionConfig(warm_starts=0, answers=True))
    assert context.answer_sets == [("yes", "no")] * 5
    candidates = {k: v for k, v in list(context.fixed().items())[:3]}
    loss, ce, mass = context.scored(candidates, [1, 3])
    composer = context.composer
    for name, weights in candidates.items():
        composer.compose(weights)
        want, masses = 0.0, 0.0
        for i in (1, 3):
            nll = {}
            for answer in ("yes", "no"):  # one sequence at a time
                [batch] = composer.family.loss_batches(tok, [YES_NO[i]["input"]], [answer], batch_size=None)
                with torch.inference_mode():
                    nll[answer] = float(token_losses(composer.model, batch)[0][0, 0])
            log_set = float(torch.logsumexp(-torch.tensor(list(nll.values()), dtype=torch.float64), 0))
            want += (nll[YES_NO[i]["output"]] + log_set) / 2
            masses += log_set / 2
        assert loss[name] == pytest.approx(want, rel=1e-4) and mass[name] == pytest.approx(masses, rel=1e-4)
        assert 0 < loss[name] and mass[name] <= 0
    plain, _ = _context(world, YES_NO, "reference", budget=2, config=SelectionConfig(warm_starts=0, answers=False))
    assert plain.answer_sets == [None] * 5
    plain_loss, plain_ce, plain_mass = plain.scored(candidates, [1, 3])
    direct = FewShotObjective(composer, tok, [YES_NO[i]["input"] for i in (1, 3)], [YES_NO[i]["output"] for i in (1, 3)],
                              loss="mean").losses(list(candidates.values()))
    assert list(plain_loss.values()) == pytest.approx(direct, rel=1e-5) and plain_mass == {}
    assert plain_ce == plain_loss and list(ce.values()) == pytest.approx(direct, rel=1e-4)  # the CE, scored alongside
    selection = select(context)  # the report names the answer sets and each candidate's mass on them
    assert selection.report["answer_sets"] == [["yes", "no"]] * 5
    assert all(r["cv_answer_mass"] <= 0 for r in selection.report["candidates"])


_NAVIGATE = "If you follow these instructions, do you return to the starting point? {}\nOptions:\n- Yes\n- No"


def _navigate(a: int, b: int, turn: bool = True) -> dict:
    steps = f"Take {a} steps. {'Turn around. ' if turn else ''}Take {b} steps."
    return {"input": _NAVIGATE.format(steps), "output": "Yes" if turn and a == b else "No"}


def test_a_constant_answer_no_longer_wins_on_a_navigate_like_task(world, tmp_path):
    """The issue's weakness on BBH navigate: a module that learned the yes/no form upstream answers "Yes" to
    every question, so its token-mean cross-entropy on the held-out answers is low, and select cv chose it by that
    under the one-SE rule (the default then). Under the default rule now, ``paired``, it does not beat the reference
    search fold by fold by more than the noise, and loses. Scored by the right answer among the options
    (answers=True), it loses to the base model, which is right as often and not sure of the wrong answer. (On the
    real navigate that scoring fails the other way, docs/bbh.md: the score stays the cross-entropy.)"""
    from lorahub_ray.evaluation.generate import generate

    hub = tmp_path / "hub"
    make_module(world["base"], hub / "noise", seed=3, scale=0.5)
    upstream = [{"input": f"Is {w} a colour?", "output": "No" if i % 5 == 0 else "Yes"}
                for i, w in enumerate(["red", "blue", "green", "dog", "pink", "cyan", "cat", "teal", "gold", "lime"])]
    _train_solver(world["base"], hub / "yes", upstream, steps=40)
    fewshot = [_navigate(2, 2), _navigate(3, 1), _navigate(4, 4, turn=False), _navigate(5, 2), _navigate(6, 6)]
    winners, tables = {}, {}
    for answers in (False, True):
        context, tok = _context({**world, "hub": hub}, fewshot, "reference", budget=3,
                                config=SelectionConfig(warm_starts=0, answers=answers, rule="one-se"))
        selection = select(context)
        winners[answers] = selection.winner
        tables[answers] = {c["name"]: c for c in selection.report["candidates"]}
    context.composer.compose([1.0 if n == "yes" else 0.0 for n in context.names])
    assert generate(context.composer.model, tok, [r["input"] for r in fewshot], max_new_tokens=5) == ["Yes"] * 5
    assert winners[False] == "single:yes"  # one-SE: chosen by its cross-entropy, the form, not the answer
    assert tables[True]["single:yes"]["cv_ce"] == pytest.approx(tables[False]["single:yes"]["cv_loss"])
    assert winners[True] != "single:yes"
    assert tables[True]["single:yes"]["cv_loss"] > tables[True]["base"]["cv_loss"]
    # folds run once with answer sets (as the BBH table's two select cv columns share them) serve both rankings
    kept = list(sequential(context, fold_tasks(len(fewshot), context.config.folds)))
    plain, _ = _context({**world, "hub": hub}, fewshot, "reference", budget=3,
                        config=SelectionConfig(warm_starts=0, rule="one-se"))
    assert choose(plain, kept).winner == winners[False] and choose(context, kept).winner == winners[True]
    # the default rule on the same folds and the same cross-entropy: the constant answer does not win
    default, _ = _context({**world, "hub": hub}, fewshot, "reference", budget=3, config=SelectionConfig(warm_starts=0))
    chosen = choose(default, kept)
    constant = {c["name"]: c for c in chosen.report["candidates"]}["single:yes"]
    assert chosen.winner != "single:yes" and constant["paired_gain"] - constant["paired_gain_se"] <= 0
    lowest = min(chosen.report["candidates"], key=lambda c: c["cv_loss"])
    assert constant["cv_loss"] <= lowest["cv_loss"] + lowest["cv_loss_se"]  # within the noise, where one-SE took it
