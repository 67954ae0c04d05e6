"""Progress on every long wait: the bars (lorahub_ray/progress.py), and the callbacks the core reports through:
every training step, every fold × candidate of ``select="cv"``, and the commands' final lines."""

from __future__ import annotations

import io
import re
import types

import pytest
from rich.console import Console

import lorahub_ray as lr
from lorahub_ray import progress
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.model import load_base_model
from lorahub_ray.demo.world import one_torch_thread
from lorahub_ray.core.selection import (SelectionConfig, SelectionContext, make_folds, progress_plan, select,
                                        sequential)

ANSI = re.compile(r"\x1b\[[0-9;?]*[a-zA-Z]")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():  # small passes on a shared CPU (see its note)
        yield


@pytest.fixture
def terminal(monkeypatch):
    """Progress drawn into a buffer as on an interactive terminal; returns the buffer's text without ANSI codes."""
    buffer = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=buffer, force_terminal=True, force_interactive=True,
                                                             width=120))
    return lambda: ANSI.sub("", buffer.getvalue())


def test_no_progress_when_disabled_or_when_standard_error_is_not_a_terminal(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=buffer))  # a plain file: not a terminal
    for enabled in (True, False):
        with progress.progress_bar("phase", 3, enabled=enabled) as advance:
            advance(info="x")
        assert not progress.shown(enabled)
    assert buffer.getvalue() == ""
    monkeypatch.setattr(progress, "console", lambda: Console(file=buffer, force_terminal=True, force_interactive=True))
    with progress.progress_bar("phase", 3, enabled=False) as advance:
        advance()
    assert buffer.getvalue() == ""  # disabled stays off on a terminal too


def test_off_a_terminal_a_long_phase_prints_a_plain_line_a_minute_and_one_when_it_ends(monkeypatch):
    buffer, now = io.StringIO(), [1000.0]
    monkeypatch.setattr(progress, "console", lambda: Console(file=buffer))  # a log file
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(progress, "_plain_last", [0.0])
    with progress.progress_bar("BBH table", 40) as advance:
        for step in range(1, 41):
            now[0] += 20.0  # a cell every 20 s: a line every third cell, when a minute has passed
            advance(info=f"cell {step}")
            if step == 2:
                with progress.progress_bar("generating", 100) as inner:  # nested: shares the minute
                    now[0] += 70.0
                    inner(100)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "generating: 100/100 (100%), 0:01:10 elapsed"
    assert lines[1] == "generating: 100/100 (100%), 0:01:10 elapsed, done"
    assert lines[2] == "BBH table: 5/40 (12%), 0:02:50 elapsed, ~0:19:50 left: cell 5"  # a minute after the last line
    assert lines[-1] == "BBH table: 40/40 (100%), 0:14:30 elapsed, done: cell 40"
    assert len(lines) == 2 + 12 + 1  # one a minute over the 12 minutes that follow, and the end
    buffer.truncate(0), buffer.seek(0)
    with progress.progress_bar("cv: 5 folds × 14 candidates", 71) as advance:  # fractions: one decimal
        now[0] += 61.0
        advance(12 + 1 / 40)
    assert buffer.getvalue().splitlines() == ["cv: 5 folds × 14 candidates: 12.0/71 (17%), 0:01:01 elapsed, "
                                              "~0:04:59 left", "cv: 5 folds × 14 candidates: 12.0/71 (17%), "
                                              "0:01:01 elapsed, done"]
    buffer.truncate(0), buffer.seek(0)
    with progress.progress_bar("BBH table", 40) as advance:  # a resumed run: 30 cells written before
        advance(0, skip=30)
        now[0] += 61.0
        advance(2)
    assert buffer.getvalue().splitlines()[0] == "BBH table: 2/10 (20%), 0:01:01 elapsed, ~0:04:04 left"
    buffer.truncate(0), buffer.seek(0)
    with progress.progress_bar("short phase", 3) as advance:  # under a minute: nothing
        now[0] += 59.0
        advance(3)
    with progress.progress_bar("silenced", 3, enabled=False) as advance:
        now[0] += 600.0
        advance(3)
    assert buffer.getvalue() == ""


def test_off_a_terminal_a_long_search_prints_its_restarts_a_minute_and_when_it_ends(monkeypatch):
    buffer, now = io.StringIO(), [1000.0]
    monkeypatch.setattr(progress, "console", lambda: Console(file=buffer))  # a Ray job's log
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(progress, "_plain_last", [0.0])
    plans = [types.SimpleNamespace(restart=r, optimizer="NGOpt", seed=r) for r in range(2)]
    with progress.RestartsDisplay(plans, 40) as display:
        for step in range(1, 41):
            now[0] += 4.0  # both restarts step every 4 s: a line every 15 steps
            display.update(0, step, 2.0 - step / 100)
            display.update(1, step, 1.9 - step / 200)
    lines = buffer.getvalue().splitlines()
    assert lines[0] == ("search: 29/80 evaluations (36%), 0:01:00 elapsed, ~0:01:45 left, best 1.8300 (restart 1); "
                        "restarts 0: 15/40 1.8500, 1: 14/40 1.8300")  # at restart 0's 15th step
    assert lines[-1] == ("search: 80/80 evaluations (100%), 0:02:40 elapsed, done, best 1.6000 (restart 0); "
                         "restarts 0: 40/40 1.6000, 1: 40/40 1.7000")
    assert len(lines) == 3
    buffer.truncate(0), buffer.seek(0)
    with progress.RestartsDisplay(plans[:1], 40) as display:  # one restart (a Tune searcher): no list
        now[0] += 61.0
        display.update(0, 10, 1.5)
    assert buffer.getvalue().splitlines() == ["search: 10/40 evaluations (25%), 0:01:01 elapsed, ~0:03:03 left, best "
                                              "1.5000", "search: 10/40 evaluations (25%), 0:01:01 elapsed, done, "
                                              "best 1.5000"]
    buffer.truncate(0), buffer.seek(0)
    for enabled, seconds in ((True, 59.0), (False, 600.0)):  # a short search, a silenced one: nothing
        with progress.RestartsDisplay(plans, 40, enabled=enabled) as display:
            now[0] += seconds
            display.update(0, 40, 1.0)
    assert buffer.getvalue() == ""


def test_a_bar_shows_its_phase_count_and_info_and_nested_bars_join_it(terminal):
    with progress.progress_bar("outer phase", 2) as outer:
        outer(info="first half")
        with progress.progress_bar("inner phase", 4) as inner:  # a second live display would raise in rich
            inner(2.5, info="inner info")
            inner(1.5)
        outer(description="outer renamed")
    text = terminal()
    assert "outer renamed" in text and "2/2" in text and "first half" in text
    assert "inner phase" in text  # drawn while it ran ...
    last = text.rstrip().splitlines()[-1]
    assert "outer renamed" in last and "inner phase" not in last  # ... and gone when its phase ended
    with progress.progress_bar("a phase of unknown length", None):
        pass
    assert terminal().rstrip().splitlines()[-1].split()[-2:] == ["━" * 20, "0:00:00"]  # no 0/?
    with progress.progress_bar("loading", None) as advance:
        advance(3, info="the third")
    assert terminal().rstrip().splitlines()[-1].split()[-5:] == ["━" * 20, "3", "0:00:00", "the", "third"]


def test_skipped_units_leave_a_bars_total(terminal):
    with progress.progress_bar("BBH table", 40) as advance:
        advance(0, skip=30, info="resumed")
        advance(2, info="computed")
    assert re.search(r"BBH table\s.*\s2/10\s.*computed", terminal())


@pytest.mark.parametrize("width", [80, 100, 160])
def test_a_long_phase_and_info_are_cut_never_the_bar_count_and_time(monkeypatch, width):
    buffer = io.StringIO()
    monkeypatch.setattr(progress, "console", lambda: Console(file=buffer, force_terminal=True, force_interactive=True,
                                                             width=width))
    with progress.progress_bar("cv: 5 folds × 14 candidates and a longer label still", 71) as advance:
        advance(12.5, info="fold 2: from-best-1 17/40 and a great deal more text " * 3)
    last = ANSI.sub("", buffer.getvalue()).rstrip().splitlines()[-1]
    assert len(last) <= width and " 12/71 0:00:00 " in last and "fold 2: from-best-1" in last
    assert ("…" in last) and (last.count("━") + last.count("╸") + last.count("╺") >= 12)


def test_training_reports_every_step_with_its_loss(world, tmp_path, terminal):
    from lorahub_ray.core.train import train_module

    steps = []
    result = train_module(str(world["base"]), str(world["examples"]), tmp_path / "mod", rank=2, steps=4,
                          batch_size=2, callback=lambda step, loss: steps.append((step, loss)))
    assert steps == list(enumerate(result.losses, 1)) and len(steps) == 4
    text = terminal()
    assert "loading the base model" in text and "writing the adapter" in text
    assert "training (seq2seq, r=2)" in text and "4/4" in text and f"loss {result.losses[-1]:.4f}" in text


def _context(world, budget: int, **config) -> SelectionContext:
    modules = lr.load_modules([str(p) for p in world["modules"]])
    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    rows = lr.read_examples(str(world["examples"]))
    return SelectionContext(LoraComposer(base, modules), tok, rows.inputs, rows.outputs,
                            names=[m.name for m in modules], budget=budget, config=SelectionConfig(**config))


def test_cv_reports_every_evaluation_of_every_fold_and_candidate_and_the_refit(world):
    budget = 3
    context = _context(world, budget, warm_starts=1)
    calls = []
    chosen = select(context, advance=lambda n=1, **fields: calls.append((n, fields.get("info"))))
    label, total = progress_plan(context)
    folds, candidates, searches = len(make_folds(5)), len(context.candidate_names()), len(context.settings)
    assert (folds, candidates, searches) == (5, 1 + 4 + 2, 2)
    assert label == f"cv: {folds} folds × {candidates} candidates" and total == folds * candidates + 1
    assert sum(n for n, _ in calls) == pytest.approx(total)  # the bar ends full, whatever the winner
    evaluations = [info for n, info in calls if n == pytest.approx(1 / budget)]
    refit = int(chosen.report["cost"]["refit_searches"])
    assert len(evaluations) == folds * searches * budget + refit * budget  # every evaluation, each heard once
    for f in range(folds):
        for setting in context.settings:
            prefix = f"fold {f + 1}: {setting.name} "
            assert [i[len(prefix):].split("/")[0] for i in evaluations if i.startswith(prefix)] == [
                str(e) for e in range(1, budget + 1)]
    assert [i.split("/")[0] for i in evaluations if i.startswith("refit ")] == [
        f"refit {e}" for e in range(1, refit * budget + 1)]
    assert calls[-1][1] == f"winner {chosen.winner}"


def test_cv_on_another_backend_reports_a_whole_fold_at_a_time(world):
    context = _context(world, 2, warm_starts=0)
    calls = []
    backend = lambda ctx, tasks: list(sequential(ctx, tasks))  # noqa: E731 - folds run elsewhere, unseen here
    select(context, map_folds=backend, advance=lambda n=1, **fields: calls.append((n, fields.get("info"))))
    per_fold = len(context.candidate_names())
    assert [(n, info) for n, info in calls if info and info.endswith("done")] == [
        (per_fold, f"fold {f + 1} done") for f in range(5)]
    assert sum(n for n, _ in calls) == pytest.approx(progress_plan(context)[1])


def test_cli_search_select_cv_shows_folds_times_candidates_and_ends_with_the_winner_and_reason(world, tmp_path,
                                                                                               terminal):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    result = CliRunner().invoke(app, ["search", "--model", str(world["base"]), "--modules", str(world["hub"]),
                                      "--examples", str(world["examples"]), "--output", str(tmp_path / "out"),
                                      "--budget", "2", "--select", "cv"])
    assert result.exit_code == 0, result.output
    text = terminal()
    assert "loading modules" in text and "loading the base model" in text and "writing the output" in text
    assert "cv: 5 folds × 8 candidates" in text and "41/41" in text
    selection = lr.Recipe.load(tmp_path / "out").search["selection"]
    assert f"selected {selection['winner']} has" in " ".join(result.output.split())


def test_cli_train_ends_with_the_modules_loss(world, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    result = CliRunner().invoke(app, ["train", "-m", str(world["base"]), "-d", str(world["examples"]), "-o",
                                      str(tmp_path / "m"), "--steps", "3", "--rank", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert re.search(r"loss \d+\.\d{4} -> \d+\.\d{4} over 3 steps; wrote .*m", " ".join(result.output.split()))
