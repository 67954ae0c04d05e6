"""The ``lorahub-ray`` Typer app and what every command shares: the console, one-line errors and
warnings, and the options that several commands take. Each command group lives in its own module
of this package and registers itself on :data:`app`."""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from lorahub_ray.errors import LoraHubError, LoraHubWarning

app = typer.Typer(
    name="lorahub-ray",
    help="LoraHub on Ray: adapt a language model to a new task from a few examples by composing LoRA modules "
    "with a gradient-free search, then evaluate, compare and serve the result.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
console = Console(stderr=True)
WIDE = 240  # columns of a result table written to a file or a pipe


def results_console() -> Console:
    """Standard output for a command's result table: the terminal's width on a terminal, and off one (a file, a
    pipe, a job's log) wide enough that no column is cut to an ellipsis, as rich's default of 80 would (``COLUMNS``
    still decides when set)."""
    out = Console()
    return out if out.is_terminal or "COLUMNS" in os.environ else Console(width=WIDE)


def reflow_help(group: typer.Typer) -> None:
    """Each command's help as ``--help`` prints it: prose paragraphs as one line each, which rich wraps to the
    terminal, and example paragraphs (command lines) as written; in the lists of commands, the first paragraph.
    Typer keeps a docstring's line breaks in rich mode, so prose broke off mid-sentence where the source did.
    Applies to the groups below too; an explicit ``help`` or ``short_help`` is kept."""
    for info in group.registered_commands:
        doc = info.callback.__doc__ if info.callback else None
        if info.help is None and doc:
            paragraphs = inspect.cleandoc(doc).split("\n\n")
            info.help = "\n\n".join(p if _is_example(p) else " ".join(p.split()) for p in paragraphs)
        if info.short_help is None and info.help:
            info.short_help = " ".join(info.help.split("\n\n")[0].split())
    for sub in group.registered_groups:
        reflow_help(sub.typer_instance)


def _is_example(paragraph: str) -> bool:
    return any(line.startswith(("lorahub-ray ", "LORAHUB_RAY_", " ")) for line in paragraph.splitlines())


def show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """lorahub-ray's own warnings as one line on the console, others as Python shows them."""
    if issubclass(category, LoraHubWarning):
        console.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    else:
        _default(message, category, filename, lineno, file, line)


warnings.showwarning = show_warning

SeedOpt = Annotated[int, typer.Option(help="Seed of the optimizer (the reference's default is 42).")]
BudgetOpt = Annotated[int, typer.Option(help="Number of objective evaluations (the paper uses 40).")]
OptimizerOpt = Annotated[str, typer.Option(help="nevergrad optimizer by name: NGOpt (default, picks an algorithm from dimension and budget), CMA, OnePlusOne, RandomSearch, Cobyla, ...")]
InputFieldOpt = Annotated[str, typer.Option(help="Name of the input column/field in the data files.")]
OutputFieldOpt = Annotated[str, typer.Option(help="Name of the target column/field in the data files.")]
TemplateOpt = Annotated[Optional[str], typer.Option(help="How inputs become prompts: 'plain' (the text as it is) or 'chat' (the tokenizer's chat template, the input as the user turn, for instruct models). Default: the recipe's, else plain.")]
SplitOpt = Annotated[Optional[str], typer.Option(help="For a task source (bbh:TASK, reasoning-gym:NAME, bigbench:TASK or bigbench:TASK/SUBTASK, a task.json or a task folder): the seeded split to read, fewshot (5 examples) or test (the rest, disjoint, at most 250); default: fewshot for --examples, test for --data.", rich_help_panel="Task sources")]
SplitSeedOpt = Annotated[Optional[int], typer.Option(help="For a task source: the seed of the few-shot/test split (and of BIG-bench's option shuffle); default: the source's own, 42 for bbh: (the paper's draw), 0 otherwise.", rich_help_panel="Task sources")]
DeviceOpt = Annotated[Optional[str], typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")]


def quiet_libraries() -> None:
    """Silence the libraries' own chatter (transformers' logging and progress bars, their
    UserWarnings and FutureWarnings), but never lorahub-ray's own warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # LoraHubWarning subclasses UserWarning: this filter goes in front of the one above
    warnings.filterwarnings("default", category=LoraHubWarning)


def fail_cleanly(fn):
    """Bad input ends in one clear line (exit 2), not a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoraHubError as exc:
            console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # one line
            raise typer.Exit(2) from None

    return wrapper
