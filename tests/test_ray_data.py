"""Sharded evaluation with Ray Data and the paper's comparison."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lorahub_ray as lr
from lorahub_ray.evaluation import generate as generation
from helpers import EXAMPLES, write_jsonl
from lorahub_ray.api import compare, evaluate_data
from lorahub_ray.evaluation.compare import InContextPrompt, icl_prompt
from lorahub_ray.errors import DataError
from lorahub_ray.evaluation.evaluate import (
    METRICS_FILE,
    PREDICTIONS_FILE,
    group_batches,
    group_of,
    list_data_files,
)
from lorahub_ray.demo.world import build_default_hub

TIMING = ("seconds", "examples_per_second", "workers", "cpus_per_worker", "gpus_per_worker")


def _rows(n, seed):
    rnd = random.Random(seed)
    words = ["abc", "ray", "lora", "hub", "xy", "hello", "q", "data"]
    rows = []
    for _ in range(n):
        w = "".join(rnd.choice(words) for _ in range(rnd.randint(1, 4)))
        rows.append({"input": f"reverse: {w}", "output": w[::-1]})
    return rows


def _write(path, rows):
    fmt = path.suffix
    if fmt == ".jsonl":
        write_jsonl(path, rows)
    elif fmt == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path.write_text("input,output\n" + "".join(f"{r['input']},{r['output']}\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tasks(tmp_path_factory):
    """A folder of three tasks in three formats, BBH style (one file per task)."""
    root = tmp_path_factory.mktemp("tasks")
    _write(root / "alpha.jsonl", _rows(40, 1) + EXAMPLES)
    _write(root / "beta.parquet", _rows(25, 2))
    _write(root / "gamma.csv", _rows(15, 3) + [{"input": "reverse: 700", "output": "007"}])
    (root / "README.txt").write_text("not data")
    return root


@pytest.fixture(scope="session")
def learned_model(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("learned") / "run"
    lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), output=out, budget=3,
                        progress=False)
    return out


@pytest.fixture(scope="session")
def in_process(learned_model, tasks):
    return evaluate_data(str(learned_model), str(tasks), batch_size=4, max_new_tokens=6, progress=False)


def _without_timing(metrics):
    return {k: v for k, v in metrics.items() if k not in TIMING}


# --- the batching plan and reading ---------------------------------------------------------------


def test_batching_plan_depends_only_on_content():
    assert group_of("t", "reverse: abc", 7) == group_of("t", "reverse: abc", 7)
    assert group_of("t", "x", 7) != group_of("u", "x", 7)
    inputs, targets = ["ccc", "a", "bb", "a", "dddd"], ["3", "1", "2", "0", "4"]
    assert group_batches(inputs, targets, 2) == [[3, 1], [2, 0], [4]]  # by (length, input, target)


def test_folder_of_tasks_in_three_formats(in_process, tasks):
    assert [p.rsplit("/", 1)[-1] for p in list_data_files(str(tasks))] == ["alpha.jsonl", "beta.parquet", "gamma.csv"]
    m = in_process.metrics
    assert m["examples"] == 86 and sorted(m["tasks"]) == ["alpha", "beta", "gamma"]
    assert [m["tasks"][t]["examples"] for t in ("alpha", "beta", "gamma")] == [45, 25, 16]
    assert m["macro_accuracy"] == pytest.approx(sum(t["accuracy"] for t in m["tasks"].values()) / 3)
    assert m["input_tokens_per_example"] > 10
    # CSV fields stay text: "007" is not read as the number 7
    assert "007" in in_process.predictions["target"]


def test_evaluation_equals_plain_generation_on_its_batches(learned_model, tasks, in_process):
    """The in-process path is generate() on the planned batches: recompute one group by hand."""
    from lorahub_ray.core.model import load_model

    model, tok = load_model(str(learned_model))
    p = in_process.predictions
    idx = [i for i, t in enumerate(p["task"]) if t == "beta"]
    inputs = [p["input"][i] for i in idx]
    targets = [p["target"][i] for i in idx]
    groups = {group_of("beta", x, 2) for x in inputs}
    assert len(groups) == 2  # 25 rows, batch 4: 2 groups
    for g in groups:
        members = [k for k, x in enumerate(inputs) if group_of("beta", x, 2) == g]
        sub_in, sub_t = [inputs[k] for k in members], [targets[k] for k in members]
        for batch in group_batches(sub_in, sub_t, 4):
            expected = generation.generate(model, tok, [sub_in[k] for k in batch], max_new_tokens=6)
            got = [p["prediction"][idx[members[k]]] for k in batch]
            assert got == expected


@pytest.mark.parametrize("content, message", [
    ('{"input": "a", "output": "b"}\n{"input": "c"}\n', r"bad\.jsonl, line 2: missing field 'output'"),
    ('{"input": "a", "output": "b"}\n{"input": 5, "output": "x"}\n', r"bad\.jsonl, line 2: field 'input' must be a string"),
    ("", r"bad\.jsonl: no examples \(empty file\)"),
])
def test_malformed_rows_fail_before_any_model_loads(tmp_path, content, message, ray_cluster):
    data = tmp_path / "tasks"
    data.mkdir()
    write_jsonl(data / "good.jsonl", EXAMPLES)
    (data / "bad.jsonl").write_text(content)
    missing_model = str(tmp_path / "no-such-model")  # loading it would be a different error
    for workers in (0, 1):
        with pytest.raises(DataError, match=message):
            evaluate_data(missing_model, str(data), workers=workers, progress=False)


def test_unknown_data_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        evaluate_data("m", str(tmp_path / "nothing-here"), progress=False)


# --- sharded equals single-process ---------------------------------------------------------------


def test_sharded_result_equals_in_process_result(ray_cluster, learned_model, tasks, in_process, tmp_path):
    sharded = evaluate_data(str(learned_model), str(tasks), workers=2, batch_size=4, max_new_tokens=6,
                            output=tmp_path / "eval", progress=False)
    assert sharded.predictions == in_process.predictions
    assert _without_timing(sharded.metrics) == _without_timing(in_process.metrics)
    assert sharded.metrics["workers"] == 2 and sharded.metrics["examples_per_second"] > 0
    table = pq.read_table(tmp_path / "eval" / PREDICTIONS_FILE)
    assert table.column_names == ["task", "input", "target", "prediction", "correct", "input_tokens"]
    assert table.column("prediction").to_pylist() == in_process.predictions["prediction"]
    saved = json.loads((tmp_path / "eval" / METRICS_FILE).read_text())
    assert saved["accuracy"] == in_process.metrics["accuracy"]


@pytest.fixture(scope="session")
def s3_tasks(tasks):
    """The task folder on a real S3 API (moto server on loopback); the AWS env points at it meanwhile."""
    from s3 import moto_server, upload_dir

    with moto_server():
        yield upload_dir(tasks, "s3://bench/bbh/")


def test_s3_prefix_in_process(s3_tasks, learned_model, in_process):
    """JSONL, Parquet and CSV read from a real S3 API (moto server on loopback) give the local result."""
    local = evaluate_data(str(learned_model), s3_tasks, batch_size=4, max_new_tokens=6, progress=False)
    assert local.predictions == in_process.predictions


# --- the comparison ------------------------------------------------------------------------------


def test_icl_prompt_format():
    assert icl_prompt(["in 1", "in 2"], ["out 1", "out 2"], "test") == "in 1\nout 1\n\nin 2\nout 2\n\ntest"
    assert icl_prompt([], [], "test") == "test"
    prompt = InContextPrompt.from_examples(lr.read_examples(str(write_jsonl_tmp())))
    assert prompt("reverse: q").startswith("reverse: abc\ncba\n\nreverse: hello\nolleh\n\n")
    assert prompt("reverse: q").endswith("reverse: ray\nyar\n\nreverse: q")


def write_jsonl_tmp():
    import tempfile
    from pathlib import Path

    return write_jsonl(Path(tempfile.mkdtemp()) / "fewshot.jsonl", EXAMPLES)


def test_compare_writes_table_plot_and_predictions(world, learned_model, tmp_path):
    test = write_jsonl(tmp_path / "test.jsonl", _rows(10, 11))
    report = compare(str(world["base"]), str(learned_model), str(world["examples"]), str(test),
                     output=tmp_path / "cmp", batch_size=4, max_new_tokens=6, progress=False)
    arms = report["arms"]
    assert list(arms) == ["zero-shot", "ICL", "LoraHub"]
    assert arms["ICL"]["input_tokens_per_example"] > arms["zero-shot"]["input_tokens_per_example"] + 50
    assert arms["LoraHub"]["input_tokens_per_example"] == arms["zero-shot"]["input_tokens_per_example"]
    for arm in arms:
        assert (tmp_path / "cmp" / arm / PREDICTIONS_FILE).is_file()
    # the ICL predictions record the original input, not the prompt
    icl = pq.read_table(tmp_path / "cmp" / "ICL" / PREDICTIONS_FILE).column("input").to_pylist()
    assert sorted(icl) == sorted(r["input"] for r in _rows(10, 11))
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["arms"] == arms


def test_compare_refuses_a_directory_without_recipe(world, tmp_path):
    with pytest.raises(lr.LoraHubError, match="not a lorahub-ray output directory"):
        compare(str(world["base"]), str(tmp_path), str(world["examples"]), str(world["examples"]), progress=False)


# --- the command line ----------------------------------------------------------------------------


@pytest.mark.slow  # its parts run by default: sharded = in process, S3 = local, and the CLI's evaluate
def test_cli_evaluate_sharded_from_s3(ray_cluster, s3_tasks, learned_model, in_process, tmp_path):
    """`evaluate --workers 2` on an S3 prefix: Ray Data's readers on a pyarrow filesystem over
    s3fs, two actors, and the same predictions as the local in-process run."""
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--model", str(learned_model), "--data", s3_tasks, "--workers", "2",
                              "--batch-size", "4", "--max-new-tokens", "6", "--output", str(tmp_path / "ev")])
    assert res.exit_code == 0, res.output
    assert "macro accuracy" in res.output and f"on {in_process.metrics['examples']} examples" in res.output
    preds = pq.read_table(tmp_path / "ev" / PREDICTIONS_FILE).to_pydict()
    assert preds == in_process.predictions
    saved = json.loads((tmp_path / "ev" / METRICS_FILE).read_text())
    assert saved["tasks"] == in_process.metrics["tasks"] and saved["workers"] == 2


def test_cli_bad_data_is_one_line_exit_2(learned_model, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"input": "a"}])
    res = CliRunner().invoke(app, ["evaluate", "--model", str(learned_model), "--data", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl, line 1: missing field 'output'" in res.output.replace("\n", "")


@pytest.mark.slow  # the full recipe builds the demo world: 3-10 minutes on 2 cores (the demo shows the same)
@pytest.mark.timeout(1800)
def test_compare_on_the_embedded_default_shows_lorahub_above_zero_shot(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "cache" / "default-hub"
    hub = build_default_hub(cache)
    name, task = sorted(hub.unseen_tasks.items())[0]
    out = tmp_path_factory.mktemp("default-compare")
    lr.lorahub_learning(str(hub.base_model), [str(p) for p in hub.modules.values()], str(task.fewshot),
                        output=out / "run", progress=False)
    report = compare(str(hub.base_model), str(out / "run"), str(task.fewshot), str(task.test),
                     output=out / "cmp", progress=False)
    arms = report["arms"]
    assert arms["LoraHub"]["accuracy"] > arms["zero-shot"]["accuracy"], arms
    assert arms["LoraHub"]["input_tokens_per_example"] < arms["ICL"]["input_tokens_per_example"]
