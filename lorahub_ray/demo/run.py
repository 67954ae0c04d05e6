"""The embedded default, end to end: LoraHub on every unseen task of the toy hub."""

from __future__ import annotations

import time
from pathlib import Path

from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.io.examples import read_examples
from lorahub_ray.evaluation.generate import accuracy, generate
from lorahub_ray.core.model import load_base_model
from lorahub_ray.core.modules import load_modules
from lorahub_ray.core.objective import FewShotObjective
from lorahub_ray.progress import progress_bar
from lorahub_ray.core.search import minimize


def run_demo(*, cache_dir: Path | None = None, budget: int = 40, optimizer: str = "NGOpt", seed: int = 42,
             progress: bool = True) -> dict:
    """Build (or reuse) the toy hub, then for each unseen task measure zero-shot accuracy of the base,
    run LoraHub learning on its 5 examples and measure the composed model's accuracy.

    The base model and the K stacked modules are loaded once and shared by all tasks: only the
    composed weights change between tasks.
    """
    from lorahub_ray.demo.world import build_default_hub

    start = time.perf_counter()
    hub = build_default_hub(cache_dir, progress=progress)
    built = time.perf_counter() - start
    modules = load_modules([str(p) for p in hub.modules.values()])
    model, tokenizer, _ = load_base_model(str(hub.base_model), device="cpu")
    composer = LoraComposer(model, modules)
    names = [m.name for m in modules]
    tasks = []
    for task in hub.unseen_tasks.values():
        task_start = time.perf_counter()
        fewshot, test = read_examples(str(task.fewshot)), read_examples(str(task.test))
        composer.compose([0.0] * len(modules))  # a zero composition is exactly the base model
        zero_shot = accuracy(generate(composer.model, tokenizer, test.inputs), test.outputs)
        objective = FewShotObjective(composer, tokenizer, fewshot.inputs, fewshot.outputs)
        with progress_bar(f"{task.name}: search", budget, enabled=progress) as advance:
            result = minimize(objective, len(modules), budget=budget, optimizer=optimizer, seed=seed,
                              callback=lambda e, best: advance(info=f"best {best:.4f}"))
        composer.compose(result.weights)
        lorahub = accuracy(generate(composer.model, tokenizer, test.inputs), test.outputs)
        tasks.append({
            "task": task.name, "description": task.description, "test_examples": len(test),
            "zero_shot": zero_shot, "lorahub": lorahub, "objective": result.objective, "algorithm": result.algorithm,
            "weights": dict(zip(names, result.weights)), "seconds": time.perf_counter() - task_start,
        })
    return {"hub": str(hub.root), "build_seconds": built, "total_seconds": time.perf_counter() - start,
            "budget": budget, "optimizer": optimizer, "seed": seed, "tasks": tasks}


def print_report(report: dict, *, top: int = 3) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"LoraHub on the embedded default ({report['optimizer']}, budget {report['budget']}, seed {report['seed']})")
    for column, justify in [("unseen task", "left"), ("zero-shot %", "right"), ("LoraHub %", "right"),
                            ("gain", "right"), ("top modules (weight)", "left"), ("time", "right")]:
        table.add_column(column, justify=justify)
    for t in report["tasks"]:
        best = sorted(t["weights"].items(), key=lambda kv: -abs(kv[1]))[:top]
        table.add_row(f"{t['task']}\n[dim]{t['description']}[/]", f"{t['zero_shot']:.1f}", f"{t['lorahub']:.1f}",
                      f"{t['lorahub'] - t['zero_shot']:+.1f}", ", ".join(f"{n} ({w:+.2f})" for n, w in best),
                      f"{t['seconds']:.1f}s")
    console = Console()
    console.print(table)
    console.print(f"hub: {report['hub']} (ready in {report['build_seconds']:.1f}s); total {report['total_seconds']:.1f}s")
