"""``--select cv`` against the reference and the simple baselines, on the embedded default's unseen tasks.

For each unseen task of the toy hub (lorahub_ray/demo/world.py; built and cached on first use) and
each seed, side by side in one run, with one base model and the K stacked modules shared by all arms:

* zero-shot: the base model alone;
* LoraHub: the reference search (NGOpt, budget 40, from 0, loss + 0.05·mean|w|) on the 5 examples;
* best single: the one module with the lowest loss on the 5 examples (weight 1);
* cv (loss) and cv (generate): ``select="cv"`` scored by the held-out loss, and by exact match of
  greedy generations on the held-out example (the folds' searches are run once and ranked both ways).

Held-out accuracy is exact match on the task's 200 test examples. The cost of cv is its searches
(candidate searches x folds, plus the refit of a search winner), its objective evaluations and
seconds, next to the one search of LoraHub. Torch runs on one thread (see the note in demo/world.py).

Usage: python benchmarks/selection.py [--seeds 42 43 44] [--budget 40] [--warm-starts 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

from lorahub_ray.core.compose import LoraComposer  # noqa: E402
from lorahub_ray.core.model import load_base_model  # noqa: E402
from lorahub_ray.core.modules import load_modules  # noqa: E402
from lorahub_ray.core.objective import FewShotObjective  # noqa: E402
from lorahub_ray.core.search import minimize  # noqa: E402
from lorahub_ray.core.selection import SelectionConfig, SelectionContext, choose, cross_validate  # noqa: E402
from lorahub_ray.demo.world import build_default_hub  # noqa: E402
from lorahub_ray.evaluation.generate import accuracy, generate  # noqa: E402
from lorahub_ray.io.examples import read_examples  # noqa: E402


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def run(seeds, budget: int, warm_starts: int) -> dict:
    hub = build_default_hub(progress=False)
    modules = load_modules([str(p) for p in hub.modules.values()])
    model, tok, _ = load_base_model(str(hub.base_model), device="cpu")
    composer = LoraComposer(model, modules)
    names = [m.name for m in modules]

    def test_accuracy(weights, test):
        composer.compose(weights)
        return accuracy(generate(composer.model, tok, test.inputs, max_new_tokens=8), test.outputs)

    tasks = {}
    for task in hub.unseen_tasks.values():  # what does not depend on the seed, once per task
        fewshot, test = read_examples(str(task.fewshot)), read_examples(str(task.test))
        objective = FewShotObjective(composer, tok, fewshot.inputs, fewshot.outputs)
        onehots = [[1.0 if j == i else 0.0 for j in range(len(names))] for i in range(len(names))]
        single_losses = objective.losses(onehots)
        best = min(range(len(names)), key=lambda i: single_losses[i])
        tasks[task.name] = (fewshot, test, objective, test_accuracy([0.0] * len(names), test), best,
                            test_accuracy(onehots[best], test))
    rows = []
    for seed in seeds:  # seed-major: each seed's table is complete before the next starts
        for name, (fewshot, test, objective, zero, best, single) in tasks.items():
            start = time.perf_counter()
            ref = minimize(objective, len(names), budget=budget, seed=seed)
            ref_seconds = time.perf_counter() - start
            config = SelectionConfig(score="generate", warm_starts=warm_starts, max_new_tokens=8)
            context = SelectionContext(composer, tok, fewshot.inputs, fewshot.outputs, names=names, budget=budget,
                                       seed=seed, config=config)
            start = time.perf_counter()
            folds = cross_validate(context)
            fold_seconds = time.perf_counter() - start
            arms = {}
            for score in ("loss", "generate"):
                context.config = dataclasses.replace(config, score=score)
                start = time.perf_counter()
                chosen = choose(context, folds, fold_seconds=fold_seconds)
                cost = chosen.report["cost"]
                arms[score] = {"accuracy": test_accuracy(chosen.weights, test), "winner": chosen.winner,
                               "weights": dict(zip(names, chosen.weights)), "reason": chosen.report["reason"],
                               "searches": cost["fold_searches"] + cost["refit_searches"],
                               "evaluations": cost["evaluations"],
                               "seconds": fold_seconds + time.perf_counter() - start}
            rows.append({"task": name, "seed": seed, "zero_shot": zero, "best_single": single,
                         "best_single_module": names[best], "lorahub": test_accuracy(ref.weights, test),
                         "lorahub_weights": dict(zip(names, ref.weights)), "lorahub_seconds": ref_seconds,
                         "lorahub_evaluations": len(ref.history), "folds": len(folds), "cv": arms})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"budget": budget, "warm_starts": warm_starts, "seeds": list(seeds), "rows": rows}


def print_table(report: dict) -> None:
    print(f"embedded default, budget {report['budget']}, {report['warm_starts']} warm starts, seeds {report['seeds']}; "
          "held-out exact match % on 200 test examples")
    print("| task | seed | zero-shot | LoraHub | best single (few-shot loss) | cv loss (winner) | cv generate (winner) "
          "| LoraHub cost | cv cost: searches (folds x candidates + refit), evaluations, s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rows"]:
        cv = r["cv"]
        print(f"| {r['task']} | {r['seed']} | {r['zero_shot']:.1f} | {r['lorahub']:.1f} | {r['best_single']:.1f} "
              f"({r['best_single_module']}) | {cv['loss']['accuracy']:.1f} ({cv['loss']['winner']}) | "
              f"{cv['generate']['accuracy']:.1f} ({cv['generate']['winner']}) | 1 search, "
              f"{r['lorahub_evaluations']} evals, {r['lorahub_seconds']:.1f} s | loss: {cv['loss']['searches']}, "
              f"{cv['loss']['evaluations']}, {cv['loss']['seconds']:.1f} s; generate: {cv['generate']['searches']}, "
              f"{cv['generate']['evaluations']}, {cv['generate']['seconds']:.1f} s |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--warm-starts", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    _quiet()
    torch.set_num_threads(1)
    report = run(args.seeds, args.budget, args.warm_starts)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
