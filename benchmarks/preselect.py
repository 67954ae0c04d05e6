"""Preselection on a hub of 50 modules, of which only a few help any given task (issue 13, third benchmark).

The hub is the embedded default's larger variant (``lorahub_ray.demo.world.build_large_hub``): its 8
upstream modules plus 42 distractors trained on other synthetic tasks, all on the same base model. For
each unseen task (5 few-shot examples, 200 test examples), with NGOpt, budget 40, in one process:

* ``--preselect 20``: every module scored alone on the 5 examples, the search over the 20 best started at
  the best-screened module (weight 1 on it, 0 on the others), what ``--preselect`` does;
* the same search started at 0 (the reference's start; ``--preselect`` did this before it was measured here);
* random 20 of 50, the paper's protocol: 5 runs, seeds seed..seed+4, each its own random subset
  (``plan_restarts``), mean and spread of their accuracies;
* all 50 modules in one search;
* the base model zero-shot, for scale.

It also prints what screening costs: its seconds against one search step (the median evaluation of
the preselected search), per 10 modules (goal: at most 2 steps' worth per 10 modules).

Run: ``python benchmarks/preselect.py [--distractors 42] [--distractor-steps 60] [--tasks biggest,lowest]``
from the repository root. The hub is built once and cached (``$LORAHUB_RAY_CACHE``); the build time is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lorahub_ray.core.compose import LoraComposer  # noqa: E402
from lorahub_ray.core.model import load_base_model  # noqa: E402
from lorahub_ray.core.modules import load_modules  # noqa: E402
from lorahub_ray.core.objective import FewShotObjective  # noqa: E402
from lorahub_ray.core.preselect import DEFAULT_CHUNK, screen, screen_and_choose  # noqa: E402
from lorahub_ray.core.portfolio import plan_restarts  # noqa: E402
from lorahub_ray.core.search import minimize  # noqa: E402
from lorahub_ray.demo.world import DISTRACTOR_TASKS, LargeConfig, build_large_hub  # noqa: E402
from lorahub_ray.evaluation.generate import accuracy, generate  # noqa: E402
from lorahub_ray.io.examples import read_examples  # noqa: E402


def search_and_score(composer, objective, tokenizer, test, modules, *, budget, optimizer, seed, start=None) -> dict:
    """Search over the hub indices ``modules`` (the composer restricted to them), from 0 or, with ``start`` (a hub
    index among ``modules``), from weight 1 on that module; then the test accuracy."""
    with composer.restrict(modules):
        init = None if start is None else [1.0 if i == start else 0.0 for i in modules]
        result = minimize(objective, len(modules), budget=budget, optimizer=optimizer, seed=seed, init=init)
        composer.compose(result.weights)
        acc = accuracy(generate(composer.model, tokenizer, test.inputs), test.outputs)
    steps = [e.seconds for e in result.history]
    return {"objective": result.objective, "accuracy": acc, "step": statistics.median(steps),
            "top": sorted(zip((composer.modules[i].name for i in modules), result.weights), key=lambda kv: -abs(kv[1]))[:3]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distractors", type=int, default=len(DISTRACTOR_TASKS))
    parser.add_argument("--distractor-steps", type=int, default=LargeConfig().lora_steps)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--random-runs", type=int, default=5)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--optimizer", default="NGOpt")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tasks", default=None, help="comma-separated unseen tasks (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunks", default="1,8,50", help="also time the screen with these chunk sizes")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    start = time.perf_counter()
    hub = build_large_hub(large=LargeConfig(distractors=args.distractors, lora_steps=args.distractor_steps))
    built = time.perf_counter() - start
    modules = load_modules([str(p) for p in hub.modules.values()])
    model, tokenizer, _ = load_base_model(str(hub.base_model), device="cpu")
    composer = LoraComposer(model, modules)
    names = [m.name for m in modules]
    everything = list(range(len(modules)))
    k = min(args.k, len(modules))
    print(f"hub {hub.root}: {len(modules)} modules ({args.distractors} distractors, {args.distractor_steps} steps "
          f"each), ready in {built:.1f} s", flush=True)

    wanted = args.tasks.split(",") if args.tasks else list(hub.unseen_tasks)
    report = {"modules": len(modules), "k": k, "budget": args.budget, "optimizer": args.optimizer, "seed": args.seed,
              "build_seconds": built, "tasks": []}
    for task in (hub.unseen_tasks[t] for t in wanted):
        fewshot, test = read_examples(str(task.fewshot)), read_examples(str(task.test))
        objective = FewShotObjective(composer, tokenizer, fewshot.inputs, fewshot.outputs)
        composer.compose([0.0] * len(modules))
        zero_shot = accuracy(generate(composer.model, tokenizer, test.inputs), test.outputs)
        screening = screen_and_choose(objective, names, k)
        best = screening.ranking()[0]  # where --preselect starts its search
        chosen = search_and_score(composer, objective, tokenizer, test, screening.chosen, budget=args.budget,
                                  optimizer=args.optimizer, seed=args.seed, start=best)
        from_zero = search_and_score(composer, objective, tokenizer, test, screening.chosen, budget=args.budget,
                                     optimizer=args.optimizer, seed=args.seed)
        randoms = [search_and_score(composer, objective, tokenizer, test, plan.modules, budget=args.budget,
                                    optimizer=args.optimizer, seed=plan.seed)
                   for plan in plan_restarts(len(modules), args.random_runs, seed=args.seed, optimizer="NGOpt", modules_per_restart=k)]
        full = search_and_score(composer, objective, tokenizer, test, everything, budget=args.budget,
                                optimizer=args.optimizer, seed=args.seed)
        per_10 = screening.seconds / (len(modules) / 10) / chosen["step"]
        chunk_times = {}
        for c in (int(c) for c in args.chunks.split(",")):
            clock = time.perf_counter()
            screen(objective, len(modules), chunk=c)
            chunk_times[c] = time.perf_counter() - clock
        row = {
            "task": task.name, "zero_shot": zero_shot, "preselect": chosen, "preselect_from_zero": from_zero,
            "best_screened": names[best],
            "random": {"accuracy_mean": statistics.mean(r["accuracy"] for r in randoms),
                       "accuracy_min": min(r["accuracy"] for r in randoms),
                       "accuracy_max": max(r["accuracy"] for r in randoms),
                       "objective_mean": statistics.mean(r["objective"] for r in randoms)},
            "all": full, "chosen": [names[i] for i in screening.chosen],
            "screen_seconds": screening.seconds, "step_seconds": chosen["step"], "screen_steps_per_10_modules": per_10,
            "screen_seconds_by_chunk": chunk_times,
        }
        report["tasks"].append(row)
        print(f"\n{task.name}: zero-shot {zero_shot:.1f}%", flush=True)
        print(f"  preselect {k}, from the best screened ({row['best_screened']}): {chosen['accuracy']:.1f}% "
              f"(objective {chosen['objective']:.4f}; top {chosen['top']})")
        print(f"  preselect {k}, from 0: {from_zero['accuracy']:.1f}% (objective {from_zero['objective']:.4f}; "
              f"top {from_zero['top']})")
        print(f"  random {k} of {len(modules)} x{len(randoms)}: mean {row['random']['accuracy_mean']:.1f}% "
              f"(min {row['random']['accuracy_min']:.1f}, max {row['random']['accuracy_max']:.1f}; "
              f"objective mean {row['random']['objective_mean']:.4f})")
        print(f"  all {len(modules)}: {full['accuracy']:.1f}% (objective {full['objective']:.4f}; top {full['top']})")
        print(f"  screening {len(modules)} modules {screening.seconds:.3f} s; one search step {chosen['step'] * 1e3:.1f} ms; "
              f"= {per_10:.2f} steps per 10 modules (goal <= 2) with chunk {DEFAULT_CHUNK}; by chunk: "
              + ", ".join(f"{c}: {t:.3f} s = {t / (len(modules) / 10) / chosen['step']:.2f} steps/10"
                          for c, t in chunk_times.items()))
        print(f"  preselected: {', '.join(row['chosen'])}", flush=True)

    print(f"\n| unseen task | zero-shot | preselect {k} (from the best screened) | preselect {k}, from 0 | random {k} of "
          f"{len(modules)} (mean of {args.random_runs}; min-max) | all {len(modules)} | screening ÷ step, per 10 modules |")
    print("|---|---|---|---|---|---|---|")
    for row in report["tasks"]:
        r = row["random"]
        print(f"| {row['task']} | {row['zero_shot']:.1f}% | {row['preselect']['accuracy']:.1f}% ({row['best_screened']}) | "
              f"{row['preselect_from_zero']['accuracy']:.1f}% | "
              f"{r['accuracy_mean']:.1f}% ({r['accuracy_min']:.1f}–{r['accuracy_max']:.1f}) | {row['all']['accuracy']:.1f}% | "
              f"{row['screen_steps_per_10_modules']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
