"""``lorahub-ray demo`` on a tiny embedded default (seconds): the report, the table within 80 columns, the CLI."""

from __future__ import annotations

import functools
import io
import json

import pytest
from rich.console import Console

from lorahub_ray.demo import world
from lorahub_ray.demo.run import RECOMMENDED, print_report, run_demo

TINY = world.BuildConfig(d_model=32, layers=1, batch_size=8, base_steps=10, lora_steps=3, test=40)


@pytest.fixture
def tiny_hub(tmp_path, monkeypatch):
    """The demo builds the tiny recipe instead of the default one (minutes)."""
    monkeypatch.setattr(world, "build_default_hub", functools.partial(world.build_default_hub, config=TINY))
    return tmp_path / "cache"


@pytest.fixture
def report(tiny_hub):
    return run_demo(cache_dir=tiny_hub, budget=3, progress=False)


def test_each_unseen_task_has_zero_shot_lorahub_and_the_recommended_setting(report):
    from lorahub_ray.core.selection import SelectionConfig

    assert [t["task"] for t in report["tasks"]] == list(world.UNSEEN_TASKS) and report["recommended"] == RECOMMENDED
    modules = list(world.UPSTREAM_TASKS)
    candidates = ["base"] + [f"single:{m}" for m in modules] + [s.name for s in SelectionConfig().settings(len(modules))]
    for t in report["tasks"]:
        assert t["test_examples"] == TINY.test
        ours, paper = t["recommended"], t["lorahub"]
        for value in (t["zero_shot"], paper["accuracy"], ours["accuracy"]):
            assert 0.0 <= value <= 100.0
        assert t["gain"] == pytest.approx(ours["accuracy"] - paper["accuracy"])
        assert list(paper["weights"]) == list(ours["weights"]) == modules
        assert ours["winner"] in candidates and ours["reason"].startswith(f"{ours['winner']} has")
        if ours["winner"] == "base":
            assert ours["accuracy"] == t["zero_shot"] and not any(ours["weights"].values())
        elif ours["winner"].startswith("single:"):
            assert ours["weights"] == {m: float(m == ours["winner"][len("single:"):]) for m in modules}
        assert 0 < paper["seconds"] and 0 < ours["seconds"]
        assert ours["searches"] == 5 * 3 + (ours["winner"] in candidates[-3:])  # leave-one-out, 3 searches a fold
    json.dumps(report)  # what --output writes


def _printed(report: dict, width: int) -> list[str]:
    buffer = io.StringIO()
    print_report(report, console=Console(file=buffer, width=width))
    return buffer.getvalue().splitlines()


def test_the_table_and_everything_below_it_fit_80_columns(report):
    wide = {**report, "hub": "/a/very/long/cache/path/" + "x" * 120,
            "tasks": [{**t, "recommended": {**t["recommended"], "reason": "a reason " * 40}} for t in report["tasks"]]}
    for r in (report, wide):
        lines = _printed(r, 80)
        assert max(len(line) for line in lines) <= 80
        header = next(i for i, line in enumerate(lines) if "zero-shot" in line)
        for name in ("unseen task", "LoraHub", "lorahub-ray", RECOMMENDED, "gain", "time"):
            assert name in lines[header - 1] + lines[header]  # a header of two lines
        caption = next(i for i, line in enumerate(lines) if line.startswith("gain:"))
        rows = {line.split()[0]: line.split()[1:] for line in lines[header + 2:caption] if line.split()}
        assert len(rows) == len(world.UNSEEN_TASKS) + 1  # one row per task, on one line each, and the mean
        for t in r["tasks"]:
            assert rows[t["task"]][:4] == [f"{t['zero_shot']:.1f}", f"{t['lorahub']['accuracy']:.1f}",
                                           f"{t['recommended']['accuracy']:.1f}", f"{t['gain']:+.1f}"]


def test_cli_demo_prints_its_table_within_80_columns_and_writes_the_json(tiny_hub, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    out = tmp_path / "demo.json"
    result = CliRunner().invoke(app, ["demo", "--cache-dir", str(tiny_hub), "--budget", "3", "--output", str(out)],
                                env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80 and any("unseen task" in line for line in lines)
    saved = json.loads(out.read_text())
    assert [t["task"] for t in saved["tasks"]] == list(world.UNSEEN_TASKS)
    for t in saved["tasks"]:
        assert f"{t['recommended']['accuracy']:.1f}" in result.stdout and t["recommended"]["winner"] in result.stdout
