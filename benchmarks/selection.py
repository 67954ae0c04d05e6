"""``--select cv`` against the reference and the simple baselines, on the embedded default's unseen tasks.

For each unseen task of the toy hub (lorahub_ray/demo/world.py; built and cached on first use) and
each seed, side by side in one run, with one base model and the K stacked modules shared by all arms:

* zero-shot: the base model alone;
* LoraHub: the reference search (NGOpt, budget 40, from 0, loss + 0.05·mean|w|) on the 5 examples;
* best single: the one module with the lowest loss on the 5 examples (weight 1);
* cv (loss) and cv (generate): ``select="cv"`` scored by the held-out loss, under each rule of
  ``lorahub_ray.core.selection_rules`` (one-SE, paired against LoraHub, lowest), and by exact match of
  greedy generations on the held-out example (the folds' searches are run once and ranked every way).

Held-out accuracy is exact match on the task's 200 test examples. The cost of cv is its searches
(candidate searches x folds, plus the refit of a search winner), its objective evaluations and
seconds, next to the one search of LoraHub. Torch runs on one thread (see the note in demo/world.py).

With ``--workers W`` the same folds also run on W Ray actors (``lorahub_ray.cluster.folds.RayFolds``, a
local Ray started once for the run, one torch thread per actor), right after the sequential ones: the
benchmark checks that they give the same fold results and prints the fold phase's wall time on Ray
÷ in this process, with the actors' start (model load) counted in.

Usage: python benchmarks/selection.py [--seeds 42 43 44] [--budget 40] [--warm-starts 2] [--workers W] [--json out.json]
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
from common import draws_of  # noqa: E402


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _same_folds(a, b) -> bool:
    """The same fold results up to float noise: held-out losses to 1e-5 and the same fitted weights to 1e-6."""
    def close(x, y, tol):
        return abs(x - y) <= tol * max(1.0, abs(x), abs(y))
    return all(ra.fold == rb.fold and ra.correct == rb.correct and ra.loss.keys() == rb.loss.keys()
               and all(close(ra.loss[k], rb.loss[k], 1e-5) for k in ra.loss)
               and all(close(x, y, 1e-6) for k in ra.weights for x, y in zip(ra.weights[k], rb.weights[k]))
               for ra, rb in zip(a, b))


# cv's rankings of the same folds: arm -> (score, rule, column label)
ARMS = {"one-se": ("loss", "one-se", "cv, loss, one-SE rule"),
        "paired": ("loss", "paired", "cv, loss, paired vs LoraHub"),
        "min": ("loss", "min", "cv, loss, lowest"),
        "generate": ("generate", "one-se", "cv, generate")}


def run(seeds, budget: int, warm_starts: int, workers: int = 0, draws: int = 1) -> dict:
    hub = build_default_hub(progress=False)
    ray_folds = None
    if workers:
        from lorahub_ray.cluster.connect import connect
        from lorahub_ray.cluster.folds import RayFolds

        start = time.perf_counter()
        connect(None)  # a local Ray for the whole run; its start is not a fold's cost
        print(f"Ray started in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
        ray_folds = RayFolds(workers, cpus_per_worker=1)
    modules = load_modules([str(p) for p in hub.modules.values()])
    model, tok, _ = load_base_model(str(hub.base_model), device="cpu")
    composer = LoraComposer(model, modules)
    names = [m.name for m in modules]

    def test_accuracy(weights, test):
        composer.compose(weights)
        return accuracy(generate(composer.model, tok, test.inputs, max_new_tokens=8), test.outputs)

    tasks = {}
    for task in hub.unseen_tasks.values():  # what does not depend on the seed, once per task and draw
        for draw, (fewshot, test) in enumerate(draws_of(task, draws)):
            objective = FewShotObjective(composer, tok, fewshot.inputs, fewshot.outputs)
            onehots = [[1.0 if j == i else 0.0 for j in range(len(names))] for i in range(len(names))]
            single_losses = objective.losses(onehots)
            best = min(range(len(names)), key=lambda i: single_losses[i])
            tasks[task.name if draw == 0 else f"{task.name}-{draw}"] = (
                fewshot, test, objective, test_accuracy([0.0] * len(names), test), best,
                test_accuracy(onehots[best], test))
    rows = []
    for seed in seeds:  # seed-major: each seed's table is complete before the next starts
        for name, (fewshot, test, objective, zero, best, single) in tasks.items():
            start = time.perf_counter()
            ref = minimize(objective, len(names), budget=budget, seed=seed)
            ref_seconds = time.perf_counter() - start
            config = SelectionConfig(score="generate", warm_starts=warm_starts, max_new_tokens=8)
            context = SelectionContext(composer, tok, fewshot.inputs, fewshot.outputs, names=names, budget=budget,
                                       seed=seed, config=config, model=str(hub.base_model), device="cpu")
            start = time.perf_counter()
            folds = cross_validate(context)
            fold_seconds = time.perf_counter() - start
            on_ray = None
            if ray_folds is not None:
                start = time.perf_counter()
                ray_results = cross_validate(context, map_folds=ray_folds)
                on_ray = {"workers": workers, "seconds": time.perf_counter() - start,
                          "same_folds": _same_folds(folds, ray_results)}
            arms = {}
            for arm, (score, rule, _) in ARMS.items():
                context.config = dataclasses.replace(config, score=score, rule=rule)
                start = time.perf_counter()
                chosen = choose(context, folds, fold_seconds=fold_seconds)
                cost = chosen.report["cost"]
                arms[arm] = {"accuracy": test_accuracy(chosen.weights, test), "winner": chosen.winner,
                               "weights": dict(zip(names, chosen.weights)), "reason": chosen.report["reason"],
                               "searches": cost["fold_searches"] + cost["refit_searches"],
                               "evaluations": cost["evaluations"],
                               "seconds": fold_seconds + time.perf_counter() - start}
            rows.append({"task": name, "seed": seed, "zero_shot": zero, "best_single": single,
                         "best_single_module": names[best], "lorahub": test_accuracy(ref.weights, test),
                         "lorahub_weights": dict(zip(names, ref.weights)), "lorahub_seconds": ref_seconds,
                         "lorahub_evaluations": len(ref.history), "folds": len(folds), "cv": arms,
                         "fold_seconds": fold_seconds, "searches_per_fold": len(context.settings),
                         "folds_on_ray": on_ray})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"budget": budget, "warm_starts": warm_starts, "seeds": list(seeds), "draws": draws, "rows": rows}


def print_table(report: dict) -> None:
    ray_rows = [r for r in report["rows"] if r["folds_on_ray"]]
    if ray_rows:
        print(f"the folds of cv, in this process and on {ray_rows[0]['folds_on_ray']['workers']} Ray actors "
              "(actor start and model load included)")
        print("| task | seed | folds x searches | in this process, s | on Ray, s | Ray ÷ one process | same folds |")
        print("|---|---|---|---|---|---|---|")
        for r in ray_rows:
            ray = r["folds_on_ray"]
            print(f"| {r['task']} | {r['seed']} | {r['folds']} x {r['searches_per_fold']} | {r['fold_seconds']:.1f} | "
                  f"{ray['seconds']:.1f} | {ray['seconds'] / r['fold_seconds']:.3f} | {ray['same_folds']} |")
        print()
    print(f"embedded default, budget {report['budget']}, {report['warm_starts']} warm starts, seeds {report['seeds']}, "
          f"{report['draws']} few-shot draw(s) per task (task-d: the d-th other draw); held-out exact match % on the "
          "test examples")
    print("| task | seed | zero-shot | LoraHub | best single (few-shot loss) | "
          + " | ".join(f"{label} (winner)" for _, _, label in ARMS.values()) + " |")
    print("|---|---|---|---|---|" + "---|" * len(ARMS))
    for r in report["rows"]:
        cv = r["cv"]
        print(f"| {r['task']} | {r['seed']} | {r['zero_shot']:.1f} | {r['lorahub']:.1f} | {r['best_single']:.1f} "
              f"({r['best_single_module']}) | " + " | ".join(f"{cv[a]['accuracy']:.1f} ({cv[a]['winner']})" for a in ARMS)
              + " |")
    rows = report["rows"]
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    print(f"| mean of {len(rows)} | | {mean([r['zero_shot'] for r in rows]):.1f} | {mean([r['lorahub'] for r in rows]):.1f} "
          f"| {mean([r['best_single'] for r in rows]):.1f} | "
          + " | ".join(f"{mean([r['cv'][a]['accuracy'] for r in rows]):.1f}" for a in ARMS) + " |")
    for a in ARMS:
        print(f"cv {a}: >= best single on {sum(r['cv'][a]['accuracy'] >= r['best_single'] for r in rows)} of {len(rows)}, "
              f">= LoraHub on {sum(r['cv'][a]['accuracy'] >= r['lorahub'] for r in rows)}")
    r = rows[0]
    print(f"cost per task: LoraHub 1 search, {r['lorahub_evaluations']} evaluations, "
          f"{mean([r['lorahub_seconds'] for r in rows]):.1f} s; cv {r['folds']} folds x {r['searches_per_fold']} searches "
          f"+ the refit of a search winner: {mean([r['cv']['one-se']['evaluations'] for r in rows]):.0f} evaluations, "
          f"{mean([r['cv']['one-se']['seconds'] for r in rows]):.1f} s (mean)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--warm-starts", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0, help="also run the folds on this many Ray actors")
    parser.add_argument("--draws", type=int, default=1,
                        help="per task, the few-shot file and DRAWS-1 other 5-example draws from its test set")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    _quiet()
    torch.set_num_threads(1)
    report = run(args.seeds, args.budget, args.warm_starts, args.workers, args.draws)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
