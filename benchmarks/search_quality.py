"""Quality at equal budget per restart, on the embedded default's unseen tasks (trained modules, so that
held-out accuracy means something): objective and held-out accuracy per task, side by side, for

* ``reference``: lorahub 0.1.0's ``lorahub_learning`` (NGOpt, one process);
* ``one process``: ``lorahub_ray.lorahub_learning``;
* ``W=2 portfolio``: ``lorahub_learning_ray(workers=2)``, the default (2 restarts as Tune trials, 1 ask each);
* ``W=2 asks=2``: ``lorahub_learning_ray(workers=2, restarts=1, asks=2)``, the old default;
* with ``--searchers optuna,hyperopt,...``: ``lorahub_learning_ray(workers=2, searcher=NAME)``, a Tune search
  algorithm with a trial per candidate (budget 40 trials, 2 at a time), and its cost per trial (the Tune
  run's seconds ÷ trials; for the portfolio, per evaluation of a restart).

Every arm has budget 40 per restart and seed 42. The objective is the few-shot objective of the
returned weights (reference loss + 0.05·mean|w|, computed by lorahub-ray for the reference too);
accuracy is exact match on each task's held-out test file with the merged model.

``--draws N`` adds, per task, N-1 other 5-example draws from its test set (``task-d``, scored on the rest of
the test set; ``benchmarks/common.draws_of``): more held-out few-shot problems from the same hub.

Run: ``python benchmarks/search_quality.py [--budget 40] [--workers 2] [--draws 1] [--searchers random,optuna]``
from the repository root (the embedded default is built and cached on first use, about 2 minutes).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from common import draws_of  # noqa: E402


def reference_arm(base, modules, data, budget, seed):
    import lorahub.algorithm as ref

    with contextlib.redirect_stdout(io.StringIO()):  # it prints every step
        weights, model, tokenizer = ref.lorahub_learning([str(m) for m in modules], list(data.inputs),
                                                         list(data.outputs), max_inference_step=budget,
                                                         model_name_or_path=str(base), batch_size=None, seed=seed)
    return [float(w) for w in weights], model, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--draws", type=int, default=1, help="few-shot draws per task (the file, then others)")
    parser.add_argument("--searchers", default="", help="Tune searchers to compare, e.g. random,optuna,hyperopt")
    parser.add_argument("--no-asks", action="store_true", help="leave out the old default (W=2 asks=2)")
    args = parser.parse_args()

    import ray

    import lorahub_ray as lr
    from lorahub_ray.cluster.ray_search import lorahub_learning_ray
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.model import load_base_model
    from lorahub_ray.demo.world import build_default_hub

    warnings.simplefilter("ignore")
    hub = build_default_hub(progress=False)
    modules = list(hub.modules.values())
    loaded = lr.load_modules([str(m) for m in modules])
    print(f"embedded default: {len(modules)} modules, tasks {', '.join(hub.unseen_tasks)}; budget {args.budget} per "
          f"restart, seed {args.seed}, {os.cpu_count()} cores", flush=True)
    for attempt in range(6):  # on a busy machine the raylet may miss Ray's 30 s start window
        try:
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                     log_to_driver=False)
            break
        except Exception:  # noqa: BLE001
            ray.shutdown()
            if attempt == 5:
                raise
    rows = []
    costs = collections.defaultdict(list)  # seconds of the Tune run per evaluation (per trial, for a searcher)
    with tempfile.TemporaryDirectory() as tmp:
        problems = [(task_name if d == 0 else f"{task_name}-{d}", data, test)
                    for task_name, task in hub.unseen_tasks.items()
                    for d, (data, test) in enumerate(draws_of(task, args.draws))]
        for name, data, test in problems:
            base, tok, _ = load_base_model(str(hub.base_model), device="cpu")
            objective = lr.FewShotObjective(LoraComposer(base, loaded), tok, data.inputs, data.outputs)

            def accuracy(model, tokenizer, test=test) -> float:
                return lr.evaluate(model, (test.inputs, test.outputs), tokenizer=tokenizer, progress=False)["accuracy"]

            arms = {}
            start = time.perf_counter()
            weights, model, tokenizer = reference_arm(hub.base_model, modules, data, args.budget, args.seed)
            arms["reference"] = (objective(weights), accuracy(model, tokenizer), time.perf_counter() - start, "NGOpt")
            start = time.perf_counter()
            local = lr.lorahub_learning(str(hub.base_model), loaded, (data.inputs, data.outputs), budget=args.budget,
                                        seed=args.seed, progress=False)
            arms["one process"] = (local.recipe.objective, accuracy(local.model, local.tokenizer),
                                   time.perf_counter() - start, local.recipe.algorithm)
            ray_arms = [(f"W={args.workers} portfolio", {})]
            if not args.no_asks:
                ray_arms.append((f"W={args.workers} asks={args.workers}", {"restarts": 1, "asks": args.workers}))
            ray_arms += [(f"tune:{n}", {"searcher": n}) for n in args.searchers.split(",") if n]
            for label, kwargs in ray_arms:
                start = time.perf_counter()
                result = lorahub_learning_ray(str(hub.base_model), loaded, (data.inputs, data.outputs),
                                              output=Path(tmp) / f"{name}-{len(arms)}", workers=args.workers,
                                              budget=args.budget, seed=args.seed, progress=False, **kwargs)
                algorithms = "/".join(o.algorithm for o in result.restarts)
                evaluations = sum(len(o.history) for o in result.restarts)
                costs[label].append(result.recipe.search["fit_seconds"] / evaluations * len(result.restarts))
                arms[label] = (result.recipe.objective, accuracy(result.model, result.tokenizer),
                               time.perf_counter() - start, f"{algorithms}, won: restart {result.best.restart}")
            rows.append((name, arms))
            for label, (obj, acc, secs, how) in arms.items():
                print(f"  {name:9s} {label:16s} objective {obj:.4f}  accuracy {acc:5.1f}%  {secs:5.1f} s  ({how})",
                      flush=True)
    ray.shutdown()
    labels = list(rows[0][1])
    print("\n| task | " + " | ".join(f"{label}: objective / accuracy" for label in labels) + " |")
    print("|---|" + "---|" * len(labels))
    for name, arms in rows:
        print(f"| {name} | " + " | ".join(f"{arms[lb][0]:.4f} / {arms[lb][1]:.1f}%" for lb in labels) + " |")
    print("| mean | " + " | ".join(
        f"{sum(a[lb][0] for _, a in rows) / len(rows):.4f} / {sum(a[lb][1] for _, a in rows) / len(rows):.1f}%"
        for lb in labels) + " |")
    worse = [name for name, arms in rows if arms[labels[2]][0] > arms[labels[1]][0] + 1e-6]
    print(f"portfolio worse than one process (objective) on: {worse or 'no task'}")
    for label in labels:
        if label != labels[1]:
            print(f"{label}: accuracy >= one process on {sum(a[label][1] >= a[labels[1]][1] for _, a in rows)} of "
                  f"{len(rows)}, objective <= one process on {sum(a[label][0] <= a[labels[1]][0] + 1e-6 for _, a in rows)}")
    for label, seconds in costs.items():
        print(f"{label}: Tune run per evaluation of a restart (per trial for a searcher), mean over problems "
              f"{sum(seconds) / len(seconds) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
