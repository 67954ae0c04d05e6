"""``lorahub-ray demo``: the embedded default, end to end."""

from __future__ import annotations

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
    output: Annotated[Optional[str], typer.Option(help="Also write the full report as JSON here (local or s3://): every setting's weights, objective, time, and why cv chose its winner.")] = None,
):
    """Run the paper's LoraHub and lorahub-ray's recommended setting (--select cv) on the embedded default:
    a small byte-level T5 and a hub of LoRA modules trained on synthetic text tasks, built on first use (a few
    minutes) and cached.

    For each unseen task it prints the test accuracy of the base model zero-shot, of LoraHub and of
    --select cv on the task's 5 examples, the gain and the time; below the table, the top module weights
    and why cv chose its winner.
    """
    quiet_libraries()
    from lorahub_ray.demo.run import print_report, run_demo
    from lorahub_ray.io import storage

    report = run_demo(cache_dir=cache_dir, budget=budget, optimizer=optimizer, seed=seed)
    print_report(report)
    if output is not None:
        storage.write_json(output, report)
