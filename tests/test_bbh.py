"""`lorahub-ray bbh`: the table command on the tiny T5 world and two tiny BIG-bench-format tasks."""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lorahub_ray.cli import app
from lorahub_ray.evaluation import bbh as bbh_module
from lorahub_ray.evaluation.bbh import BASELINES, METHODS, run_subsets

DATA = Path(__file__).parent / "data" / "bigbench"
TASKS = f"{DATA / 'tiny_reverse'},{DATA / 'tiny_first_letter'}"
BBH_FILES = Path(__file__).parent / "data" / "bbh"  # hand-written files in the BBH release's format


def run_bbh(world, out, *extra):
    args = ["bbh", "--model", str(world["base"]), "--hub", str(world["hub"]), "--output", str(out), "--tasks", TASKS,
            "--seeds", "2", "--modules-per-run", "3", "--budget", "4", "--max-new-tokens", "6", "--batch-size", "8",
            *extra]
    return CliRunner().invoke(app, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def table_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("bbh") / "table"
    result = run_bbh(world, out)
    assert result.exit_code == 0, result.output
    return out


def test_table_has_every_task_method_and_column(table_dir):
    table = json.loads((table_dir / "table.json").read_text())
    assert set(table) == {"tasks", "macro"}
    assert set(table["tasks"]) == {"tiny_reverse", "tiny_first_letter"}
    for cells in list(table["tasks"].values()) + [table["macro"]]:
        assert set(cells) == set(METHODS) | set(BASELINES)
        for method in METHODS:
            cell = cells[method]
            assert 0 <= cell["accuracy"] <= 100 and cell["tokens_per_example"] > 0 and cell["seconds"] > 0
    for cells in table["tasks"].values():
        for cell in cells.values():  # a 95% interval around every accuracy, narrower with more examples
            lo, hi = cell["ci95"]
            assert lo <= cell["accuracy"] <= hi and 0 < hi - lo < 100
    for method in METHODS + BASELINES:
        assert table["macro"][method]["accuracy"] == pytest.approx(
            sum(t[method]["accuracy"] for t in table["tasks"].values()) / 2)
    assert (table_dir / "table.png").stat().st_size > 0
    for task, cells in table["tasks"].items():
        # the in-context prompt carries the 5 examples: more tokens than zero-shot, which LoraHub keeps
        assert cells["icl"]["tokens_per_example"] > 3 * cells["zero_shot"]["tokens_per_example"]
        assert cells["lorahub_mean"]["tokens_per_example"] == cells["zero_shot"]["tokens_per_example"]
        runs = cells["lorahub_mean"]["runs"]
        assert cells["lorahub_mean"]["accuracy"] == pytest.approx(sum(runs.values()) / 2)
        assert cells["lorahub_best"]["accuracy"] == max(runs.values())
        for method in METHODS:
            preds = pq.read_table(table_dir / task / method / "predictions.parquet").to_pydict()
            assert {"input", "target", "prediction", "correct"} <= set(preds)
            n = cells[method]["examples"] * (2 if method == "lorahub_mean" else 1)
            assert len(preds["input"]) == n
            assert 100 * sum(preds["correct"]) / n == pytest.approx(cells[method]["accuracy"])
        for seed in (0, 1):
            recipe = json.loads((table_dir / task / "lorahub_runs" / f"seed_{seed}" / "recipe.json").read_text())
            assert recipe["seed"] == seed and len(recipe["modules"]) == 3
    first = pq.read_table(table_dir / "tiny_first_letter" / "zero_shot" / "predictions.parquet").to_pydict()
    assert all(t.startswith("(") and "\nOptions:\n(A) " in x for x, t in zip(first["input"], first["target"]))
    # the baselines, from the test set alone; option accuracy on the multiple-choice task only
    choice, generative = table["tasks"]["tiny_first_letter"], table["tasks"]["tiny_reverse"]
    letters = [x.rpartition("\nOptions:\n")[2].count("\n(") + 1 for x in first["input"]]
    assert choice["chance"]["accuracy"] == pytest.approx(100 * sum(1 / k for k in letters) / len(letters))
    top = max(set(first["target"]), key=first["target"].count)
    assert choice["majority"]["accuracy"] == pytest.approx(100 * first["target"].count(top) / len(first["target"]))
    assert generative["chance"]["accuracy"] == 0
    for method in METHODS:
        assert 0 <= choice[method]["option_accuracy"] <= 100 and "option_accuracy" not in generative[method]
    # select cv: its winner is one of its candidates, and its recipe rebuilds the cell's model
    for cells in (choice, generative):
        winner = cells["select_cv"]["winner"]
        assert winner == "base" or winner.startswith(("single:", "lorahub", "from-best-"))
        paired = cells["select_cv"]  # ranked against the reference search, the default rule
        assert "fold by fold" in paired["reason"] and paired["reason"].startswith(paired["winner"] + " has")
        one_se = cells["select_cv_one_se"]  # the same folds, ranked by the one-SE rule
        assert "standard error" in one_se["reason"] and "fold by fold" not in one_se["reason"]


def test_saved_runs_are_run_directories_with_the_adapter_of_their_cell(table_dir):
    """Each LoraHub run (and select_cv) keeps recipe.json and adapter/ (no merged model): load_model takes it,
    and gives the predictions of its cell."""
    import lorahub_ray as lr
    from lorahub_ray.evaluation.generate import generate

    task = table_dir / "tiny_reverse"
    for run in (task / "lorahub_runs" / "seed_0", task / "select_cv"):
        assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "model").exists()
        assert lr.Recipe.load(run).adapter_sha256
        preds = pq.read_table(run / "predictions.parquet").to_pydict()
        model, tok = lr.load_model(run)
        assert generate(model, tok, preds["input"], batch_size=8, max_new_tokens=6) == preds["prediction"], run


def test_rerun_resumes_and_skips_written_cells(world, table_dir, monkeypatch):
    cell = table_dir / "tiny_reverse" / "icl" / "cell.json"
    kept = table_dir / "tiny_first_letter" / "best_single" / "cell.json"
    before, kept_before = cell.read_text(), kept.stat().st_mtime_ns
    import shutil

    shutil.rmtree(cell.parent)  # as if the run had stopped there
    mean = table_dir / "tiny_reverse" / "lorahub_mean" / "cell.json"
    mean_before = mean.stat().st_mtime_ns
    shutil.rmtree(table_dir / "tiny_reverse" / "lorahub_runs" / "seed_1")
    monkeypatch.delenv("COLUMNS", raising=False)
    counted = []  # what the table's bar is told: the rerun's work, not the cells read back
    real_bar = bbh_module.progress_bar

    @contextlib.contextmanager
    def recording_bar(description, total, **options):
        with real_bar(description, total, **options) as advance:
            def record(n=1, *, skip=0, **fields):
                counted.append((n, skip))
                advance(n, skip=skip, **fields)
            yield record
        counted.append(("total", total))

    monkeypatch.setattr(bbh_module, "progress_bar", recording_bar)
    result = run_bbh(world, table_dir)
    assert result.exit_code == 0, result.output
    total = counted.pop()[1]
    assert total == 2 * len(METHODS)
    assert sum(n for n, _ in counted) == 1 and total - sum(skip for _, skip in counted) == 1  # the icl cell alone
    assert "select_cv_one_se" in result.output and "…" not in result.output  # off a terminal: no column cut
    assert kept.stat().st_mtime_ns == kept_before  # not recomputed
    assert mean.stat().st_mtime_ns == mean_before  # its cells written: the LoraHub runs are not redone
    assert not (table_dir / "tiny_reverse" / "lorahub_runs" / "seed_1").exists()
    redone = json.loads(cell.read_text())
    assert redone["accuracy"] == json.loads(before)["accuracy"]  # the same cell again


def test_a_select_cell_of_another_ranking_is_refused_by_name_before_any_model(world, table_dir, tmp_path,
                                                                              monkeypatch):
    """A column whose ranking changed (select_cv was the one-SE rule's before it was the paired rule's) never mixes
    cells of both rankings: the rerun names the cell and where it belongs, before it loads any module."""
    import shutil

    import lorahub_ray.evaluation.bbh as bbh

    table = tmp_path / "table"
    shutil.copytree(table_dir, table)
    task = table / "tiny_reverse"
    (task / "select_cv").rename(task / "kept")  # the cells of the two rankings swapped, as an old table holds them
    (task / "select_cv_one_se").rename(task / "select_cv")
    (task / "kept").rename(task / "select_cv_one_se")
    monkeypatch.setattr(bbh, "load_hub", lambda *a: pytest.fail("loaded the hub before refusing"))
    result = run_bbh(world, table)
    assert result.exit_code == 2, result.output
    assert f"{task / 'select_cv'} holds select cv ranked by" in result.output.replace("\n", "")
    assert "it belongs in" in result.output and "select_cv_one_se" in result.output


def test_other_settings_or_foreign_directory_refused(world, table_dir, tmp_path):
    result = run_bbh(world, table_dir, "--split-seed", "1")
    assert result.exit_code == 2 and "other settings" in result.output and "split_seed" in result.output
    (tmp_path / "mine.txt").write_text("keep me")
    result = run_bbh(world, tmp_path)
    assert result.exit_code == 2 and "refusing to overwrite" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_bad_task_fails_before_any_model(world, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAHUB_RAY_BBH", str(BBH_FILES))  # holds navigate, sports_understanding, date_understanding
    args = ["bbh", "--model", str(tmp_path / "no-model"), "--hub", str(world["hub"]), "--output", str(tmp_path / "o"),
            "--tasks", "navigate,boolean_expressions"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "boolean_expressions.json: no such file" in result.output
    result = CliRunner().invoke(app, args[:-1] + ["navigat"])
    assert result.exit_code == 2 and "neither a BBH task" in result.output and "did you mean navigate" in result.output
    result = CliRunner().invoke(app, args[:-1] + ["reasoning-gym:lcm?max_value=x"])
    assert result.exit_code == 2 and "refused the config of 'lcm'" in result.output
    assert not (tmp_path / "o").exists()


def test_the_default_suite_is_the_27_real_bbh_tasks():
    from lorahub_ray.evaluation.bbh import SUITES, TRANSFER_SUITE, expand_tasks, resolve_task
    from lorahub_ray.io import bbh

    assert expand_tasks(None) == expand_tasks(["bbh"]) == list(bbh.TASKS) and len(bbh.TASKS) == 27
    assert resolve_task("web_of_lies") == ("web_of_lies", "bbh:web_of_lies")
    assert "bigbench:logical_deduction/three_objects" in SUITES["bbh-bigbench"]  # the rebuild, by its own names
    assert len(SUITES["bbh-bigbench"]) == 24 and expand_tasks(["transfer"]) == list(TRANSFER_SUITE)
    assert resolve_task(TRANSFER_SUITE[0]) == ("word_sequence_reversal-max_words=12-min_words=9", TRANSFER_SUITE[0])


def test_the_table_on_bbh_files(world, tmp_path, monkeypatch):
    """The contract: with $LORAHUB_RAY_BBH naming a release, `bbh --tasks sports_understanding,navigate --seeds 1
    --modules-per-run 6` writes table.json and <TASK>/<METHOD>/predictions.parquet, on the release's own inputs
    and targets, with every column."""
    monkeypatch.setenv("LORAHUB_RAY_BBH", str(BBH_FILES))
    out = tmp_path / "table"
    args = ["bbh", "--model", str(world["base"]), "--hub", str(world["hub"]), "--output", str(out), "--tasks",
            "sports_understanding,navigate", "--seeds", "1", "--modules-per-run", "6", "--budget", "4",
            "--max-new-tokens", "6", "--batch-size", "8"]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = json.loads((out / "table.json").read_text())
    assert list(table["tasks"]) == ["sports_understanding", "navigate"]
    for task, cells in table["tasks"].items():
        released = {(e["input"], e["target"]) for e in json.loads((BBH_FILES / "bbh" / f"{task}.json").read_text())[
            "examples"]}
        random.seed(42)  # the paper's draw of the five few-shot examples
        shuffled = sorted(released, key=lambda e: [x["input"] for x in json.loads(
            (BBH_FILES / "bbh" / f"{task}.json").read_text())["examples"]].index(e[0]))
        random.shuffle(shuffled)
        assert set(cells) == set(METHODS) | set(BASELINES)
        for method in METHODS:
            cell = cells[method]
            assert {"accuracy", "ci95", "tokens_per_example", "seconds", "examples"} <= set(cell)
            assert ("option_accuracy" in cell) == (task == "navigate")  # navigate lists "- Yes" / "- No"
            preds = pq.read_table(out / task / method / "predictions.parquet").to_pydict()
            pairs = set(zip(preds["input"], preds["target"]))
            assert pairs == released - set(shuffled[:5]) and cell["examples"] == 12 - 5  # the rest, as released
        assert cells["majority"]["accuracy"] > 0 and cells["chance"]["accuracy"] == (50.0 if task == "navigate" else 0)
    settings = json.loads((out / "bbh.json").read_text())
    assert settings["split_seed"] is None and settings["modules_per_run"] == 6


def test_run_subsets_seeded_and_bounded():
    subsets = run_subsets(30, 5, 20)
    assert subsets == run_subsets(30, 5, 20) and len({tuple(s) for s in subsets}) == 5
    assert all(len(s) == 20 == len(set(s)) and max(s) < 30 for s in subsets)
    assert subsets[0] == random.Random(0).sample(range(30), 20)  # the reference's draw, in its order
    whole = run_subsets(4, 3, 20)  # the whole hub each run, in orders of their own
    assert all(sorted(s) == [0, 1, 2, 3] for s in whole) and len({tuple(s) for s in whole}) == 3


def test_search_and_evaluate_read_bigbench_splits(world, tmp_path):
    task = DATA / "tiny_reverse"
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["search", "--model", str(world["base"]), "--modules", str(world["hub"]),
                                      "--examples", str(task), "--split-seed", "2", "--budget", "2", "--output", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "recipe.json").read_text())["num_examples"] == 5  # the few-shot split
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--data", str(task), "--split-seed", "2",
                                      "--max-new-tokens", "6", "--output", str(tmp_path / "eval")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["examples"] == 14 - 5 and list(metrics["tasks"]) == ["tiny_reverse"]  # the test split
    test_inputs = pq.read_table(tmp_path / "eval" / "predictions.parquet").column("input").to_pylist()
    from lorahub_ray.io.examples import read_examples

    assert not set(read_examples(f"{task}?seed=2").inputs) & set(test_inputs)
    result = CliRunner().invoke(app, ["evaluate", "--model", str(out), "--data", str(task), "--split", "train"])
    assert result.exit_code == 2 and "split must be one of fewshot, test" in result.output


@pytest.mark.slow
def test_ray_data_workers_give_the_same_table(world, tmp_path, ray_cluster):
    """--workers: every evaluation sharded on Ray Data and select_cv's folds on Ray actors, with the
    predictions of the in-process table."""
    from lorahub_ray.api import bbh_table

    options = dict(tasks=[str(DATA / "tiny_first_letter")], seeds=1, modules_per_run=2, budget=2, max_new_tokens=6,
                   batch_size=4, progress=False)
    local = bbh_table(str(world["base"]), str(world["hub"]), tmp_path / "local", **options)
    sharded = bbh_table(str(world["base"]), str(world["hub"]), tmp_path / "ray", workers=1,
                        address=ray_cluster["address"], **options)
    for method in ("zero_shot", "icl", "lorahub_best", "best_single", "select_cv"):
        a = pq.read_table(tmp_path / "local" / "tiny_first_letter" / method / "predictions.parquet").to_pydict()
        b = pq.read_table(tmp_path / "ray" / "tiny_first_letter" / method / "predictions.parquet").to_pydict()
        assert a == b, method
        assert local["tasks"]["tiny_first_letter"][method]["accuracy"] == \
            sharded["tasks"]["tiny_first_letter"][method]["accuracy"]
    assert not list((tmp_path / "ray" / "tiny_first_letter").glob("**/.model-*"))  # the saved models are removed
    recipe = json.loads((tmp_path / "ray" / "tiny_first_letter" / "select_cv" / "recipe.json").read_text())
    assert recipe["search"]["selection"]["folds_backend"]["workers"] == 1


def test_hub_may_be_a_catalogue(world, tmp_path):
    from lorahub_ray.evaluation.bbh import load_hub
    from lorahub_ray.io import catalogue

    cat = tmp_path / "hub.parquet"
    catalogue.add(cat, [str(world["hub"])])
    assert sorted(m.name for m in load_hub(str(cat))) == sorted(m.name for m in load_hub(str(world["hub"])))


@pytest.mark.parametrize("command", ["bbh", "search", "evaluate", "compare"])
def test_help_renders(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--split-seed" in result.output


def test_evaluate_reads_bbh_and_reasoning_gym_sources(world, tmp_path, monkeypatch):
    """`evaluate --data` reads a source's test split, for BBH and reasoning-gym as for BIG-bench."""
    from lorahub_ray.io.examples import read_examples
    from lorahub_ray.io.sources import with_split

    monkeypatch.setenv("LORAHUB_RAY_BBH", str(BBH_FILES))
    for data, split_seed, rows in (("bbh:sports_understanding", "3", 12 - 5),
                                   ("reasoning-gym:spell_backward?size=12&test_size=4", "1", 4)):
        out = tmp_path / data.split(":")[0]
        result = CliRunner().invoke(app, ["evaluate", "--model", str(world["base"]), "--data", data, "--split-seed",
                                          split_seed, "--max-new-tokens", "4", "--output", str(out)],
                                    catch_exceptions=False)
        assert result.exit_code == 0, result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["examples"] == rows
        inputs = set(pq.read_table(out / "predictions.parquet").column("input").to_pylist())
        assert not inputs & set(read_examples(with_split(data, None, int(split_seed))).inputs)  # no few-shot one
