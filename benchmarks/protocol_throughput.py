"""Throughput of the paper's protocol, local side (issue 13, second benchmark, the one-process half).

T tasks × S restarts × budget 40 on the embedded default: our one command (``run_protocol``, what
``lorahub-ray search --tasks DIR --restarts S --modules-per-restart K`` runs: the base model and hub loaded
once, every task's output written) against the reference ``lorahub`` 0.1.0's ``lorahub_learning`` called
T×S times in one Python process (each call loads the base model and its modules), with the same subsets and
seeds. Loading is included on both sides; both run in this process after the imports.

The tasks are the default's unseen tasks, plus extra ones made from their test sets (other 5-example
draws) until there are T. ``--world flan-t5-base`` runs the same on a randomly initialised model shaped like
Flan-T5-base (248 M parameters, ``benchmarks/common.py``) with 20 random rank-16 modules on q and v, the paper's
20 modules per restart, and T tasks of 5 examples each (the common examples, rotated per task).

``--against DIR`` runs the Ray side once more with another checkout of the package (e.g. the last commit with the
driver loop, before the search moved onto Ray Tune), in its own process, and prints the ratio of the two.

Run: ``python benchmarks/protocol_throughput.py [--world default|flan-t5-base] [--tasks 4] [--restarts 5]
[--modules-per-restart 5] [--against DIR]`` from the repository root (needs ``pip install lorahub==0.1.0``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import run_against  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lorahub_ray.core.portfolio import plan_restarts  # noqa: E402
from lorahub_ray.core.protocol import run_protocol  # noqa: E402
from lorahub_ray.demo.world import build_default_hub  # noqa: E402
from lorahub_ray.io.examples import read_examples, write_jsonl  # noqa: E402


# the Ray side with another checkout of the package, in its own process (its own local Ray, as ours)
AGAINST = r"""
import json, sys, time
from lorahub_ray.cluster.ray_tasks import lorahub_tasks_ray
args = json.loads(sys.argv[1])
start = time.perf_counter()
summary = lorahub_tasks_ray(args["base"], args["modules"], args["tasks"], output=args["output"], workers=args["workers"],
                            restarts=args["restarts"], budget=args["budget"], seed=args["seed"],
                            modules_per_restart=args["per_restart"], progress=False)
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start,
                              "best": {r["task"]: r["objective"] for r in summary["tasks"]}}))
"""


def against(checkout: str, args: dict) -> dict:
    return run_against(checkout, AGAINST, args, timeout=7200)


def make_tasks(hub, count: int, root: Path) -> list[tuple[str, str]]:
    files = []
    draw = 0
    while len(files) < count:
        for task in hub.unseen_tasks.values():
            if len(files) == count:
                break
            rows = read_examples(str(task.fewshot if draw == 0 else task.test))
            lo = 0 if draw == 0 else 5 * (draw - 1)
            name = task.name if draw == 0 else f"{task.name}-{draw}"
            path = root / f"{name}.jsonl"
            write_jsonl(path, rows.inputs[lo:lo + 5], rows.outputs[lo:lo + 5])
            files.append((name, str(path)))
        draw += 1
    return files


def flan_t5_base_tasks(examples: Path, count: int, root: Path) -> list[tuple[str, str]]:
    """``count`` task files of the common 5 examples, rotated by the task's index (other row orders)."""
    rows = read_examples(str(examples))
    files = []
    for t in range(count):
        order = [(i + t) % len(rows) for i in range(len(rows))]
        path = root / f"task{t}.jsonl"
        write_jsonl(path, [rows.inputs[i] for i in order], [rows.outputs[i] for i in order])
        files.append((f"task{t}", str(path)))
    return files


def reference_modules(base: str, modules: dict[str, str], root: Path) -> list[str]:
    """The modules with base_model_name_or_path pointing at the base directory (the reference reads it)."""
    paths = []
    for name, path in modules.items():
        target = root / name
        shutil.copytree(path, target)
        config = json.loads((target / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = base
        (target / "adapter_config.json").write_text(json.dumps(config))
        paths.append(str(target))
    return paths


def reference(files, modules: list[str], base: str, *, restarts: int, per_restart: int | None, budget: int, seed: int):
    import lorahub.algorithm as ref

    best: dict[str, float] = {}
    original = ref.get_score
    start = time.perf_counter()
    try:
        for name, path in files:
            examples = read_examples(path)
            values: list[float] = []

            def traced(weights, *args, **kwargs):
                value = original(weights, *args, **kwargs)
                values.append(value)
                return value

            ref.get_score = traced
            for plan in plan_restarts(len(modules), restarts, seed=seed, optimizer="NGOpt", modules_per_restart=per_restart):
                ref.lorahub_learning([modules[i] for i in plan.modules], examples.inputs, examples.outputs,
                                     max_inference_step=budget, model_name_or_path=base, batch_size=None,
                                     seed=plan.seed)
            best[name] = min(values)
    finally:
        ref.get_score = original
    return time.perf_counter() - start, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", choices=["default", "flan-t5-base"], default="default",
                        help="the embedded default, or a random Flan-T5-base-shaped model with 20 rank-16 modules")
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=5)
    parser.add_argument("--modules-per-restart", type=int, default=None,
                        help="default: 5 of the embedded default's 8, 20 of the Flan-T5-base world's 20")
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workers", type=int, default=2, help="the Ray side's evaluator actors (0: leave it out)")
    parser.add_argument("--against", help="another checkout of the package: its Ray side beside ours")
    args = parser.parse_args()
    import lorahub.algorithm  # noqa: F401  (imported before either side is timed)

    with tempfile.TemporaryDirectory(prefix="lorahub-protocol-bench-") as tmp:
        tmp = Path(tmp)
        (tmp / "tasks").mkdir()
        if args.world == "default":
            hub = build_default_hub()
            base, named = str(hub.base_model), {name: str(p) for name, p in hub.modules.items()}
            files = make_tasks(hub, args.tasks, tmp / "tasks")
            args.modules_per_restart = args.modules_per_restart or 5
        else:
            from common import build_world, default_root

            world = build_world(default_root())
            base, named = str(world["base"]), {Path(p).name: p for p in world["modules"]}
            files = flan_t5_base_tasks(world["examples"], args.tasks, tmp / "tasks")
            args.modules_per_restart = args.modules_per_restart or 20
        modules = list(named.values())
        ref_modules = reference_modules(base, named, tmp / "ref-modules")
        print(f"{args.world}: {len(files)} tasks × {args.restarts} restarts × budget {args.budget}, {args.modules_per_restart} of "
              f"{len(modules)} modules per restart; torch threads {torch.get_num_threads()}", flush=True)

        start = time.perf_counter()
        summary = run_protocol(base, modules, files, output=str(tmp / "ours"), budget=args.budget,
                               seed=args.seed, restarts=args.restarts, modules_per_restart=args.modules_per_restart,
                               progress=False)
        ours = time.perf_counter() - start
        ray_summary = ray_seconds = None
        if args.workers:
            from lorahub_ray.cluster.ray_tasks import lorahub_tasks_ray  # Ray only for this side

            start = time.perf_counter()
            ray_summary = lorahub_tasks_ray(base, modules, str(tmp / "tasks"), output=str(tmp / "ray"),
                                            workers=args.workers, restarts=args.restarts, budget=args.budget,
                                            seed=args.seed, modules_per_restart=args.modules_per_restart,
                                            progress=False)
            ray_seconds = time.perf_counter() - start
            if args.against:
                other = against(args.against, {"base": base, "modules": modules, "tasks": str(tmp / "tasks"),
                                               "output": str(tmp / "against"), "workers": args.workers,
                                               "restarts": args.restarts, "budget": args.budget, "seed": args.seed,
                                               "per_restart": args.modules_per_restart})
        ref_seconds, ref_best = reference(files, ref_modules, base, restarts=args.restarts,
                                          per_restart=args.modules_per_restart, budget=args.budget, seed=args.seed)

    tasks_seconds = sum(r["seconds"] for r in summary["tasks"])
    print(f"\nours (one command: load once, {len(files)} tasks, outputs written): {ours:.1f} s "
          f"(loading and set-up {ours - tasks_seconds:.1f} s, tasks {tasks_seconds:.1f} s)")
    print(f"reference lorahub_learning × {len(files) * args.restarts}: {ref_seconds:.1f} s")
    print(f"ours ÷ reference: {ours / ref_seconds:.3f} (the one-process path)")
    if ray_summary is not None:
        ray_tasks = sum(r["seconds"] for r in ray_summary["tasks"])
        print(f"ours on Ray, W={args.workers} (Ray start, actors, {len(files)} tasks, outputs): {ray_seconds:.1f} s "
              f"(Ray and actor start-up, loading {ray_seconds - ray_tasks:.1f} s, tasks {ray_tasks:.1f} s)")
        print(f"ours on Ray ÷ reference: {ray_seconds / ref_seconds:.3f} (goal <= 0.5)")
        if args.against:
            print(f"ours on Ray ÷ the same with {args.against}: {ray_seconds:.1f} / {other['seconds']:.1f} = "
                  f"{ray_seconds / other['seconds']:.3f}; best objectives there: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in other["best"].items()))
        ray_best = {r["task"]: r["objective"] for r in ray_summary["tasks"]}
    print("\n| task | ours: best objective | ours on Ray | reference: best objective evaluated | ours: seconds |")
    print("|---|---|---|---|---|")
    for row in summary["tasks"]:
        on_ray = f"{ray_best[row['task']]:.4f}" if ray_summary is not None else "-"
        print(f"| {row['task']} | {row['objective']:.4f} | {on_ray} | {ref_best[row['task']]:.4f} | "
              f"{row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
