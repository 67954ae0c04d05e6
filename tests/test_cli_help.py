"""``lorahub-ray --help``: the lists of commands give each command's summary as prose wrapped to the terminal, and
each command's page prints its example command lines whole at 80 columns."""

import inspect

import pytest
from typer.testing import CliRunner

from lorahub_ray.cli import app


@pytest.mark.parametrize("group,command", [((), "search"), ((), "demo"), ((), "bbh"), (("hub",), "validate")])
def test_a_commands_summary_is_its_first_paragraph_on_one_line(monkeypatch, group, command):
    monkeypatch.setenv("COLUMNS", "1000")  # wide enough for any summary on one line
    result = CliRunner().invoke(app, [*group, "--help"])
    assert result.exit_code == 0, result.output
    typer_group = app if not group else next(g.typer_instance for g in app.registered_groups if g.name == group[0])
    info = next(c for c in typer_group.registered_commands if (c.name or c.callback.__name__) == command)
    summary = " ".join(inspect.cleandoc(info.callback.__doc__).split("\n\n")[0].split())
    assert len(summary) > 60  # long enough that a docstring wraps it
    row = next(line for line in result.output.splitlines() if f" {command} " in line)
    assert summary in row  # the whole summary on the command's row, not broken where the docstring broke it


def _commands(group=app, prefix=()):
    for info in group.registered_commands:
        yield (*prefix, info.name or info.callback.__name__.replace("_", "-")), info
    for sub in group.registered_groups:
        yield from _commands(sub.typer_instance, (*prefix, sub.name))


@pytest.mark.parametrize("words,info", list(_commands()), ids=lambda x: " ".join(x) if isinstance(x, tuple) else "")
def test_a_commands_help_fits_80_columns_with_its_examples_whole(monkeypatch, words, info):
    monkeypatch.setenv("COLUMNS", "80")
    result = CliRunner().invoke(app, [*words, "--help"])
    assert result.exit_code == 0, result.output
    lines = [line.strip() for line in result.output.splitlines()]
    examples = [line.strip() for line in inspect.cleandoc(info.callback.__doc__).splitlines()
                if line.startswith(" ")]  # the docstrings indent their command lines
    for line in examples:  # each example line printed whole: none wrapped into the next
        assert line in lines, line
