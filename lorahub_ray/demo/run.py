"""The embedded default, end to end: per unseen task of the toy hub, the base model zero-shot, the paper's LoraHub
and the project's recommended setting, ``select="cv"`` (chosen by held-out accuracy over 15 few-shot problems of
this hub: ``benchmarks/demo_setting.py``, docs/demo.md).

Both searches are the ones ``lorahub_learning`` runs (``select="reference"`` and ``select="cv"`` with the same
budget, optimizer and seed), on one base model and one stack of modules loaded once for all tasks; torch runs on
one thread, as the hub was built (see :func:`lorahub_ray.demo.world.one_torch_thread`). Accuracy is exact match of
greedy generations on each task's test set.
"""

from __future__ import annotations

import time
from pathlib import Path

from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.modules import load_modules
from lorahub_ray.core.objective import FewShotObjective
from lorahub_ray.core.search import minimize
from lorahub_ray.core.selection import SelectionContext, progress_plan, select
from lorahub_ray.evaluation.generate import accuracy, generate
from lorahub_ray.io.examples import read_examples
from lorahub_ray.progress import progress_bar

RECOMMENDED = "select cv"  # what the demo shows beside the paper's LoraHub
MAX_NEW_TOKENS = 8  # the toy tasks' answers are one or two letters


def run_demo(*, cache_dir: Path | None = None, budget: int = 40, optimizer: str = "NGOpt", seed: int = 42,
             progress: bool = True) -> dict:
    """Build (or reuse) the toy hub, then for each unseen task measure the test accuracy of the base model, of
    LoraHub on the task's 5 examples, and of ``select="cv"`` on them; returns the report that
    :func:`print_report` prints (JSON-serialisable)."""
    from lorahub_ray.demo.world import build_default_hub, one_torch_thread

    start = time.perf_counter()
    hub = build_default_hub(cache_dir, progress=progress)
    built = time.perf_counter() - start
    with one_torch_thread():
        modules = load_modules([str(p) for p in hub.modules.values()])
        model, tokenizer, _ = load_base_model(str(hub.base_model), device="cpu")
        composer = LoraComposer(model, modules)
        names = [m.name for m in modules]
        tasks = []
        with progress_bar("demo", 3 * len(hub.unseen_tasks), enabled=progress) as advance:
            for task in hub.unseen_tasks.values():
                tasks.append(_run_task(task, composer, tokenizer, names, advance, budget=budget, optimizer=optimizer,
                                       seed=seed, progress=progress))
    return {"hub": str(hub.root), "build_seconds": built, "total_seconds": time.perf_counter() - start,
            "budget": budget, "optimizer": optimizer, "seed": seed, "recommended": RECOMMENDED, "tasks": tasks}


def _run_task(task, composer: LoraComposer, tokenizer, names: list[str], advance, *, budget: int, optimizer: str,
              seed: int, progress: bool) -> dict:
    fewshot, test = read_examples(str(task.fewshot)), read_examples(str(task.test))
    scored: dict[tuple[float, ...], float] = {}  # weights -> test accuracy (cv may choose what was scored already)

    def test_accuracy(weights) -> float:
        key = tuple(float(w) for w in weights)
        if key not in scored:
            composer.compose(key)
            scored[key] = accuracy(generate(composer.model, tokenizer, test.inputs, max_new_tokens=MAX_NEW_TOKENS),
                                   test.outputs)
        return scored[key]

    advance(0, description=f"{task.name}: zero-shot")
    zero_shot = test_accuracy([0.0] * len(names))  # a zero composition is exactly the base model
    advance(description=f"{task.name}: LoraHub")
    start = time.perf_counter()
    objective = FewShotObjective(composer, tokenizer, fewshot.inputs, fewshot.outputs)
    with progress_bar("LoraHub search", budget, enabled=progress) as step:
        reference = minimize(objective, len(names), budget=budget, optimizer=optimizer, seed=seed,
                             callback=lambda e, best: step(info=f"best {best:.4f}"))
    lorahub_seconds = time.perf_counter() - start
    lorahub = test_accuracy(reference.weights)
    advance(description=f"{task.name}: {RECOMMENDED}")
    start = time.perf_counter()
    context = SelectionContext(composer, tokenizer, fewshot.inputs, fewshot.outputs, names=names, budget=budget,
                               optimizer=optimizer, seed=seed)
    with progress_bar(*progress_plan(context), enabled=progress) as step:
        chosen = select(context, advance=step)
    cv_seconds = time.perf_counter() - start
    recommended = test_accuracy(chosen.weights)
    advance()
    return {
        "task": task.name, "description": task.description, "test_examples": len(test),
        "zero_shot": zero_shot,
        "lorahub": {"accuracy": lorahub, "objective": reference.objective, "algorithm": reference.algorithm,
                    "weights": dict(zip(names, reference.weights)), "seconds": lorahub_seconds},
        "recommended": {"setting": RECOMMENDED, "accuracy": recommended, "winner": chosen.winner,
                        "reason": chosen.report["reason"], "objective": chosen.search.objective,
                        "weights": dict(zip(names, chosen.weights)), "seconds": cv_seconds,
                        "searches": chosen.report["cost"]["fold_searches"] + chosen.report["cost"]["refit_searches"],
                        "evaluations": chosen.report["cost"]["evaluations"]},
        "gain": recommended - lorahub,
    }


def report_table(report: dict):
    """The demo's table (a rich ``Table``): one row per unseen task and their mean, 72 columns wide at most."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=f"{len(report['tasks'])} unseen tasks, 5 examples each: "
                  "test accuracy %", title_justify="left", caption_justify="left",
                  caption=f"gain: {RECOMMENDED} − LoraHub, in points; time: each one's search, in seconds")
    for header in ("unseen task", "zero-shot", "LoraHub\n(paper)", f"lorahub-ray\n({RECOMMENDED})", "gain",
                   "time\nLoraHub", "time\nours"):
        table.add_column(header, justify="left" if header == "unseen task" else "right", no_wrap=True)
    rows = report["tasks"]
    for t in rows:
        table.add_row(t["task"], f"{t['zero_shot']:.1f}", f"{t['lorahub']['accuracy']:.1f}",
                      f"{t['recommended']['accuracy']:.1f}", f"{t['gain']:+.1f}", f"{t['lorahub']['seconds']:.1f}",
                      f"{t['recommended']['seconds']:.1f}")
    if rows:
        def mean(values):
            return sum(values) / len(values)

        table.add_section()
        table.add_row("mean", f"{mean([t['zero_shot'] for t in rows]):.1f}",
                      f"{mean([t['lorahub']['accuracy'] for t in rows]):.1f}",
                      f"{mean([t['recommended']['accuracy'] for t in rows]):.1f}",
                      f"{mean([t['gain'] for t in rows]):+.1f}", f"{mean([t['lorahub']['seconds'] for t in rows]):.1f}",
                      f"{mean([t['recommended']['seconds'] for t in rows]):.1f}", style="bold")
    return table


def print_report(report: dict, *, console=None, top: int = 3) -> None:
    """The table, then per task what each setting chose (its ``top`` module weights, and why cv chose its winner),
    then where the hub is and how long it all took; every line within the console's width."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(report_table(report))
    detail = Table.grid(padding=(0, 2))
    detail.add_column(no_wrap=True)
    detail.add_column()
    for t in report["tasks"]:
        detail.add_row(f"[bold]{t['task']}[/]", t["description"])
        detail.add_row("  LoraHub", _top(t["lorahub"]["weights"], top))
        detail.add_row(f"  {RECOMMENDED}", _top(t["recommended"]["weights"], top))
        detail.add_row("  why", t["recommended"]["reason"])
    console.print(detail, highlight=False)
    console.print(f"hub: {report['hub']} (ready in {report['build_seconds']:.1f} s); total "
                  f"{report['total_seconds']:.1f} s", highlight=False)


def _top(weights: dict[str, float], top: int) -> str:
    best = sorted(weights.items(), key=lambda kv: -abs(kv[1]))[:top]
    return ", ".join(f"{name} {w:+.2f}" for name, w in best if w) or "all 0 (the base model)"
