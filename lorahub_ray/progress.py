"""Progress bars for long work (rich), silent when disabled or when output is not a terminal."""

from __future__ import annotations

import contextlib

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, *, enabled: bool = True):
    """Yield ``advance(n=1, **fields)``; ``fields`` fill the ``{task.fields[info]}`` column."""
    if not enabled:
        yield lambda n=1, **fields: None
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task(description, total=total, info="")

        def advance(n: int = 1, **fields):
            bar.update(task, advance=n, info=fields.get("info", bar.tasks[task].fields["info"]))

        yield advance
