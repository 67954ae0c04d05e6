"""Progress displays for long work (rich), on standard error: one bar per phase (:func:`progress_bar`), or one
line per restart of a search (:class:`RestartsDisplay`).

They are silent when disabled. When standard error is not an interactive terminal (a pipe, a file, CI), rich
draws a live display only once, when it stops, so a phase that ran for minutes printed nothing until it ended:
there a bar, or a search's restarts, becomes plain lines instead (:func:`_plain_lines`), one every
:data:`PLAIN_INTERVAL` seconds of a long phase and one when it ends, none for a phase shorter than that.
``TTY_INTERACTIVE=1`` (rich's own switch) forces the bars on, ``TTY_INTERACTIVE=0`` off (to plain lines).

A bar opened while another is live joins the same display as a line below it (rich allows one live display at
a time) and goes away when its phase ends; the outermost bar stays on screen with its final count and time.
The Ray-free core reports through the ``advance`` callable a bar yields, or through plain callbacks that the
caller turns into ``advance`` calls; only this module imports rich's progress.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column
from rich.text import Text

Advance = Callable[..., None]  # advance(n=1, *, info=None, description=None, skip=0)

_live: list[Progress] = []  # the live display that nested bars join (at most one)

PLAIN_INTERVAL = 60.0  # seconds between the plain lines of a long phase off a terminal
_plain_last = [0.0]  # when the last plain line was printed, shared by nested phases: one line per interval in all


def console() -> Console:
    """Where progress goes: standard error, so that a command's results on standard output stay clean."""
    return Console(stderr=True)


def shown(enabled: bool = True) -> bool:
    """Whether a progress display would be drawn: enabled, and standard error is an interactive terminal."""
    return bool(enabled) and (bool(_live) or console().is_interactive)


def _noop(n: float = 1, **fields) -> None:
    return None


class _Count(MofNCompleteColumn):
    """``done/total``; for a phase of unknown length (its bar pulses) the count alone, once there is one."""

    def render(self, task):
        if task.total is not None:
            return super().render(task)
        return Text(f"{int(task.completed)}" if task.completed else "", style="progress.download")


def _columns(width: int) -> list:
    """Phase, bar, count, elapsed (and at 100 columns or more the time left), then the info, each on one line:
    the phase and the info are cut with an ellipsis rather than squeezing the bar and the count out."""
    wide = width >= 100
    bar, label = (20, 28) if wide else (12, 27)
    fixed = bar + 7 + 7 + (6 if wide else 0) + (5 if wide else 4)  # bar, count, elapsed, left, the gaps
    cut = dict(no_wrap=True, overflow="ellipsis")
    return [TextColumn("[bold]{task.description}", table_column=Column(max_width=label, **cut)),
            BarColumn(bar_width=bar), _Count(), TimeElapsedColumn(),
            *([TimeRemainingColumn(compact=True)] if wide else []),
            TextColumn("{task.fields[info]}", table_column=Column(max_width=max(8, width - label - fixed), **cut))]


@contextlib.contextmanager
def progress_bar(description: str, total: float | None, *, enabled: bool = True) -> Iterator[Advance]:
    """Yield ``advance(n=1, *, info=None, description=None, skip=0)``: ``n`` more done (a fraction is fine),
    ``info`` the text after the bar (kept until replaced), ``description`` a new label, ``skip`` units that need
    no work this time (a resumed run's finished cells): they leave the total, so that the count and the time left
    are those of the work that runs. ``total=None`` is a phase of unknown length: its bar pulses, with the count
    alone."""
    if not enabled:
        yield _noop
        return
    if not shown(enabled):
        with _plain_lines(description, total) as advance:
            yield advance
        return
    nested = bool(_live)
    if nested:
        bar = _live[0]
    else:
        out = console()
        bar = Progress(*_columns(out.width), console=out, transient=False)
    task = bar.add_task(description, total=total, info="")

    def advance(n: float = 1, *, info: str | None = None, description: str | None = None, skip: float = 0) -> None:
        fields = {"info": info} if info is not None else {}
        if skip and total is not None:
            fields["total"] = next(t.total for t in bar.tasks if t.id == task) - skip
        bar.update(task, advance=n, **fields, **({"description": description} if description else {}))

    if nested:
        try:
            yield advance
        finally:
            bar.remove_task(task)
        return
    _live.append(bar)
    try:
        with bar:
            yield advance
    finally:
        _live.remove(bar)


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _amount(n: float) -> str:
    """A count as a bar shows it: whole, or with one decimal where a phase advances by fractions (cv's folds)."""
    return f"{n:.0f}" if abs(n - round(n)) < 1e-9 else f"{n:.1f}"


@contextlib.contextmanager
def _plain_lines(description: str, total: float | None) -> Iterator[Advance]:
    """A bar off a terminal: a line on standard error (``BBH table: 12/40 (30%), 0:14:05 elapsed, ~0:32:52 left:
    info``) when the phase advances :data:`PLAIN_INTERVAL` seconds or more after the last line, and one when a
    phase that ran that long ends; nothing for a shorter phase."""
    start = time.monotonic()
    state = {"done": 0.0, "total": total, "info": "", "description": description}

    def line(now: float, end: str = "") -> None:
        info = f": {state['info']}" if state["info"] else ""
        status = _plain_status(state["done"], state["total"], now - start, end)
        _plain_write(f"{state['description']}: {status}{info}", now)

    def advance(n: float = 1, *, info: str | None = None, description: str | None = None, skip: float = 0) -> None:
        state["done"] += n
        state["total"] = state["total"] - skip if state["total"] is not None else None
        state["info"] = info if info is not None else state["info"]
        state["description"] = description or state["description"]
        now = time.monotonic()
        if _plain_due(start, now):
            line(now)

    yield advance
    now = time.monotonic()
    if now - start >= PLAIN_INTERVAL:
        line(now, end=", done")


def _plain_status(done: float, total: float | None, elapsed: float, end: str = "", unit: str = "") -> str:
    """``12/40 (30%), 0:14:05 elapsed, ~0:32:52 left`` (``unit`` after the count; ``end`` instead of the time left)."""
    count = _amount(done) + (f"/{_amount(total)}{unit} ({100 * done / total:.0f}%)" if total else unit)
    left = f", ~{_clock(elapsed * (total - done) / done)} left" if total and 0 < done < total and not end else ""
    return f"{count}, {_clock(elapsed)} elapsed{left}{end}"


def _plain_due(start: float, now: float) -> bool:
    """Whether a plain line is due: :data:`PLAIN_INTERVAL` since the phase began and since the last line printed."""
    return now - max(start, _plain_last[0]) >= PLAIN_INTERVAL


def _plain_write(text: str, now: float) -> None:
    out = console().file
    out.write(text + "\n")
    out.flush()
    _plain_last[0] = now


class RestartsDisplay:
    """A live display of a portfolio of restarts, one line each: evaluations done of the budget, best
    objective, evaluations per second and the algorithm that runs. Silent when disabled; off an interactive
    terminal (a job's log), one plain line a :data:`PLAIN_INTERVAL` for a search that runs that long, and one
    when it ends: ``search: 37/120 evaluations (31%), 0:02:10 elapsed, ~0:04:50 left, best 1.2345 (restart 2);
    restarts 0: 14/40 1.3100, ...``."""

    def __init__(self, plans, budget: int, *, enabled: bool = True):
        self.plans, self.budget, self.enabled = {p.restart: p for p in plans}, budget, enabled
        self.bar, self.tasks, self.first = None, {}, {}
        self.plain, self.start, self.latest = False, 0.0, {}  # off a terminal: restart -> (evaluations, best)

    def __enter__(self):
        if shown(self.enabled) and not _live:
            self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console())
            self.bar.start()
        elif self.enabled and not _live:
            self.plain, self.start = True, time.monotonic()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        if self.plain and self.latest and time.monotonic() - self.start >= PLAIN_INTERVAL:
            self._line(time.monotonic(), end=", done")

    def update(self, restart: int, evaluations: int, best: float, algorithm: str = "") -> None:
        if self.plain:
            self.latest[restart] = (evaluations, best)
            now = time.monotonic()
            if _plain_due(self.start, now):
                self._line(now)
            return
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

    def _line(self, now: float, end: str = "") -> None:
        total = self.budget * max(len(self.plans), len(self.latest))
        done = sum(n for n, _ in self.latest.values())
        winner = min(sorted(self.latest), key=lambda r: self.latest[r][1])  # a tie: the lower, as the result
        text = (f"search: {_plain_status(done, total, now - self.start, end, unit=' evaluations')}, "
                f"best {self.latest[winner][1]:.4f}")
        if len(self.plans) > 1:
            text += f" (restart {winner}); restarts " + ", ".join(
                f"{r}: {n}/{self.budget} {b:.4f}" for r, (n, b) in sorted(self.latest.items()))
        _plain_write(text, now)
