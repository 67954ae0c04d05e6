"""Progress displays for long work (rich), silent when disabled or when output is not a terminal: one bar
(:func:`progress_bar`), or one line per restart of a search (:class:`RestartsDisplay`)."""

from __future__ import annotations

import contextlib
import time

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


class RestartsDisplay:
    """A live display of a portfolio of restarts, one line each: evaluations done of the budget, best
    objective, evaluations per second and the algorithm that runs. A no-op when disabled."""

    def __init__(self, plans, budget: int, *, enabled: bool = True):
        self.plans, self.budget, self.enabled = {p.restart: p for p in plans}, budget, enabled
        self.bar, self.tasks, self.first = None, {}, {}

    def __enter__(self):
        if self.enabled:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def update(self, restart: int, evaluations: int, best: float, algorithm: str = "") -> None:
        if self.bar is None:
            return
        now = time.monotonic()
        first_n, first_t = self.first.setdefault(restart, (evaluations - 1, now))
        rate = (evaluations - first_n) / (now - first_t) if now > first_t else 0.0
        if restart not in self.tasks:
            plan = self.plans[restart]
            self.tasks[restart] = self.bar.add_task(f"restart {restart} ({plan.optimizer}, seed {plan.seed})",
                                                    total=self.budget, info="")
        self.bar.update(self.tasks[restart], completed=evaluations,
                        info=f"best {best:.4f}  {rate:.2f} eval/s  {algorithm}")
