"""Which setting ``lorahub-ray demo`` recommends: the paper's LoraHub against the project's better methods, on the
embedded default's few-shot problems, by held-out accuracy and time.

For each unseen task of the embedded default (its few-shot file, and with ``--draws N`` N-1 other 5-example draws
from its test set, scored on the rest: ``benchmarks/common.draws_of``), side by side in one process, with one base
model and the K stacked modules shared by all arms (budget 40 per search, seed 42, NGOpt):

* ``LoraHub``: the paper's search from 0 (``lorahub_learning``, ``select="reference"``);
* ``portfolio``: 2 restarts, the lowest objective wins: what ``--workers 2`` runs on Ray, here one after the other
  (``core.portfolio.plan_restarts``, as ``core.protocol.LocalRunner`` runs them: the same plans, so the same restarts; Ray's lockstep does not change them);
* ``cv``: ``select="cv"`` with its defaults (leave-one-out, base / single modules / 3 searches, the default rule:
  ``paired``; the one-SE rule's figures on the same draws are ``benchmarks/selection.py``'s);
* ``cv + portfolio`` (both): ``select="cv"`` whose every search (in the folds and the refit) is that portfolio of 2.

Accuracy is exact match on the held-out test examples (greedy, 8 new tokens); seconds are each arm's own search
time (generation not counted). Torch runs on one thread, as in the demo and the selection benchmark.

Usage: python benchmarks/demo_setting.py [--draws 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
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
from lorahub_ray.core.portfolio import RestartOutcome, best_outcome, plan_restarts  # noqa: E402
from lorahub_ray.core.search import SearchResult, minimize  # noqa: E402
from lorahub_ray.core.selection import SelectionContext, select  # noqa: E402
from lorahub_ray.demo.world import build_default_hub  # noqa: E402
from lorahub_ray.evaluation.generate import accuracy, generate  # noqa: E402
from common import draws_of  # noqa: E402

ARMS = ("LoraHub", "portfolio", "cv", "cv + portfolio")


def portfolio(composer, objective, *, budget: int, seed: int, start: int | None = None, restarts: int = 2):
    """The in-process portfolio of ``restarts`` (restart 0 is the one search; the others permute the modules, seed
    + r; all start at weight 1 on module ``start``, or at 0), as ``LocalRunner`` and the Ray search plan it; the
    lowest objective wins: ``(weights in module order, objective)``."""
    plans = plan_restarts(composer.num_modules, restarts, seed=seed, optimizer="NGOpt",
                          start_ranking=None if start is None else [start])
    outcomes = []
    for plan in plans:
        whole = plan.modules == list(range(composer.num_modules))
        with contextlib.nullcontext() if whole else composer.restrict(plan.modules):
            result = minimize(objective, len(plan.modules), budget=budget, optimizer=plan.optimizer, seed=plan.seed,
                              init=plan.init())
        outcomes.append(RestartOutcome(plan, result.weights, result.objective, result.algorithm))
    best = best_outcome(outcomes)
    weights = [0.0] * composer.num_modules
    for i, w in zip(*best.canonical()):
        weights[i] = w
    return weights, best.objective


class PortfolioContext(SelectionContext):
    """``select="cv"`` whose every search (folds and refit) is the portfolio of 2 restarts from the same start."""

    def fit(self, setting, indices, callback=None):
        if setting.l1 is not None:
            raise ValueError("the benchmark's portfolio context takes the default regulariser only")
        objective, start = self.objective(indices), None
        if setting.start:
            key = tuple(indices)
            if key not in self._rankings:
                self._rankings[key] = self.ranked_singles(objective)
            start = self._rankings[key][setting.start - 1]
        weights, value = portfolio(self.composer, objective, budget=self.budget, seed=self.seed, start=start)
        return (SearchResult(weights=weights, objective=value, optimizer=str(self.optimizer), algorithm="portfolio",
                             budget=self.budget, seed=self.seed), None if start is None else self.names[start])


def run(draws: int, budget: int, seed: int) -> dict:
    hub = build_default_hub(progress=False)
    modules = load_modules([str(p) for p in hub.modules.values()])
    model, tok, _ = load_base_model(str(hub.base_model), device="cpu")
    composer = LoraComposer(model, modules)
    names = [m.name for m in modules]
    k = len(names)

    def test_accuracy(weights, test):
        composer.compose(weights)
        return accuracy(generate(composer.model, tok, test.inputs, max_new_tokens=8), test.outputs)

    rows = []
    for task in hub.unseen_tasks.values():
        for draw, (fewshot, test) in enumerate(draws_of(task, draws)):
            arms = {}
            start = time.perf_counter()
            objective = FewShotObjective(composer, tok, fewshot.inputs, fewshot.outputs)
            ref = minimize(objective, k, budget=budget, seed=seed)
            arms["LoraHub"] = (ref.weights, time.perf_counter() - start, "")
            start = time.perf_counter()
            weights, _ = portfolio(composer, objective, budget=budget, seed=seed)
            arms["portfolio"] = (weights, time.perf_counter() - start, "")
            for arm, context_type in (("cv", SelectionContext), ("cv + portfolio", PortfolioContext)):
                start = time.perf_counter()
                context = context_type(composer, tok, fewshot.inputs, fewshot.outputs, names=names, budget=budget,
                                       seed=seed)
                chosen = select(context)
                arms[arm] = (chosen.weights, time.perf_counter() - start, chosen.winner)
            row = {"task": task.name if draw == 0 else f"{task.name}-{draw}",
                   "zero_shot": test_accuracy([0.0] * k, test),
                   "arms": {a: {"accuracy": test_accuracy(w, test), "seconds": s, "winner": winner,
                                "weights": dict(zip(names, w))} for a, (w, s, winner) in arms.items()}}
            rows.append(row)
            print(json.dumps({"task": row["task"], **{a: round(v["accuracy"], 1) for a, v in row["arms"].items()}}),
                  file=sys.stderr, flush=True)
    return {"hub": hub.root.name, "budget": budget, "seed": seed, "draws": draws, "rows": rows}


def print_table(report: dict) -> None:
    rows = report["rows"]
    print(f"embedded default ({report['hub']}), budget {report['budget']}, seed {report['seed']}, {report['draws']} "
          "few-shot draw(s) per task; held-out exact match % (search seconds)")
    print("| few-shot problem | zero-shot | " + " | ".join(ARMS) + " |")
    print("|---|---|" + "---|" * len(ARMS))
    for r in rows:
        cells = []
        for a in ARMS:
            v = r["arms"][a]
            cells.append(f"{v['accuracy']:.1f} ({v['seconds']:.1f} s{', ' + v['winner'] if v['winner'] else ''})")
        print(f"| {r['task']} | {r['zero_shot']:.1f} | " + " | ".join(cells) + " |")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    print(f"| **mean of {len(rows)}** | {mean([r['zero_shot'] for r in rows]):.1f} | "
          + " | ".join(f"**{mean([r['arms'][a]['accuracy'] for r in rows]):.1f}** "
                       f"({mean([r['arms'][a]['seconds'] for r in rows]):.1f} s)" for a in ARMS) + " |")
    for a in ARMS[1:]:
        print(f"{a}: >= LoraHub on {sum(r['arms'][a]['accuracy'] >= r['arms']['LoraHub']['accuracy'] for r in rows)} "
              f"of {len(rows)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.set_num_threads(1)
    report = run(args.draws, args.budget, args.seed)
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
