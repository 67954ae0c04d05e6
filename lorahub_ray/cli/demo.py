"""``lorahub-ray demo``: the embedded default, end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from lorahub_ray.cli.app import (BudgetOpt, OptimizerOpt, SeedOpt, app, fail_cleanly, quiet_libraries)


@app.command()
@fail_cleanly
def demo(
    cache_dir: Annotated[Optional[Path], typer.Option(help="Where the embedded default hub is built and cached (default: $LORAHUB_RAY_CACHE or ~/.cache/lorahub-ray).")] = None,
    budget: BudgetOpt = 40,
    optimizer: OptimizerOpt = "NGOpt",
    seed: SeedOpt = 42,
    output: Annotated[Optional[Path], typer.Option(help="Also write the results as JSON here.")] = None,
):
    """Run LoraHub on the embedded default: a small byte-level T5 and a hub of LoRA modules trained on
    synthetic text tasks, built on first use (a few minutes) and cached.

    For each unseen task it prints the zero-shot accuracy of the base model, the LoraHub accuracy,
    the top module weights and the time taken.
    """
    quiet_libraries()
    from lorahub_ray.demo.run import print_report, run_demo

    report = run_demo(cache_dir=cache_dir, budget=budget, optimizer=optimizer, seed=seed)
    print_report(report)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
