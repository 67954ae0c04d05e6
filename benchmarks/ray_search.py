"""The search on Ray Tune (a trial per restart over model-holding actors) against one bare evaluation, one
sequential search, the driver loop it replaced and the reference ``lorahub`` 0.1.0.

A Flan-T5-base-shaped random model (d_model 768, 12+12 layers), K=20 rank-16 LoRA modules, 5 examples,
budget 40 per restart, all built offline. Printed as ratios measured side by side in one run:

* orchestration overhead: the search phase (from a restart's first evaluation to its last, reports and
  checkpoints included; the longest restart) ÷ (budget × one bare evaluation on an actor), goal ≤ 1.10; and the
  whole Tune run (``Tuner.fit``: Tune's start, the trials' start-up, which overlaps the evaluators' model load) ÷
  the same;
* the portfolio (W restarts on W actors) ÷ one sequential search (1 restart, 1 actor): goal close to 1;
* with ``--against DIR`` (a checkout of the last commit with the driver loop, e.g. ``git worktree add
  /tmp/loop 213eb23``): the Tune search phase ÷ the driver loop's search phase on the same world, goal ≤ 1.10, and
  the two wall times;
* shared forward passes: what 2 candidates in one call cost against 2 calls (the most a barrier across trials
  could save), and 2·W restarts on W actors as independent trials ÷ W restarts;
* our wall time (loading and outputs included, Ray's start excluded) ÷ the reference's.

Run: ``python benchmarks/ray_search.py [--workers 2] [--budget 40] [--against DIR]`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import run_against  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# the same search with another checkout of the package (run in its own process and Ray)
AGAINST = r"""
import json, os, sys, time
import ray
from lorahub_ray.cluster.ray_search import lorahub_learning_ray
args = json.loads(sys.argv[1])
ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
out = {}
for restarts in (args["workers"], 2 * args["workers"]):
    start = time.perf_counter()
    result = lorahub_learning_ray(args["base"], args["modules"], (args["inputs"], args["outputs"]),
                                  output=f"{args['root']}/loop-{restarts}", workers=args["workers"], restarts=restarts,
                                  budget=args["budget"], progress=False)
    out[restarts] = {"search": max(e.wall for o in result.restarts for e in o.history),
                     "wall": time.perf_counter() - start, "objective": result.recipe.objective}
print("RESULT " + json.dumps(out))
"""


def build(root: Path, k: int, rank: int) -> tuple[Path, list[Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                      num_heads=12, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    base = root / "base"
    T5ForConditionalGeneration(config).save_pretrained(base)
    tok.save_pretrained(base)
    model = T5ForConditionalGeneration.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q", "v"],
                                                  task_type="SEQ_2_SEQ_LM", init_lora_weights=False))
    lora = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    modules = []
    for i in range(k):
        torch.manual_seed(i + 1)
        with torch.no_grad():
            for _, p in lora:
                p.copy_(torch.randn_like(p) * 0.02)
        path = root / "hub" / f"m{i:02d}"
        peft_model.save_pretrained(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = str(base)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        modules.append(path)
    return base, modules


def reference(base: Path, modules: list[Path], inputs, outputs, budget: int):
    """lorahub 0.1.0's lorahub_learning with local paths, timed with its loading."""
    import lorahub.algorithm as ref

    best = []
    original = ref.get_score

    def traced(weights, *args, **kwargs):
        value = original(weights, *args, **kwargs)
        best.append(value)
        return value

    ref.get_score = traced
    start = time.perf_counter()
    try:
        ref.lorahub_learning([str(m) for m in modules], inputs, outputs, max_inference_step=budget,
                             model_name_or_path=str(base), batch_size=None, seed=42)
    finally:
        ref.get_score = original
    return time.perf_counter() - start, min(best)


def against(checkout: str, args: dict) -> dict:
    return {int(k): v for k, v in run_against(checkout, AGAINST, args, timeout=3600).items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--modules", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--against", help="a checkout of the driver-loop version, to compare search phases")
    args = parser.parse_args()

    import ray

    import lorahub_ray as lr
    from helpers import EXAMPLES
    from lorahub_ray.cluster.evaluators import Evaluators
    from lorahub_ray.cluster.ray_search import lorahub_learning_ray

    inputs = [e["input"] for e in EXAMPLES]
    outputs = [e["output"] for e in EXAMPLES]
    W, budget = args.workers, args.budget
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, modules = build(root, args.modules, args.rank)
        print(f"model: T5 d_model 768, 12+12 layers; {args.modules} rank-{args.rank} modules; 5 examples; "
              f"budget {budget} per restart; {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f}",
              flush=True)
        loop = None
        if args.against:
            loop = against(args.against, {"base": str(base), "modules": [str(m) for m in modules], "inputs": inputs,
                                          "outputs": outputs, "root": tmp, "workers": W, "budget": budget})
        loaded = lr.load_modules([str(m) for m in modules])
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)

        def ours(name: str, workers: int, restarts: int):
            start = time.perf_counter()
            result = lorahub_learning_ray(str(base), loaded, (inputs, outputs), output=root / name, workers=workers,
                                          restarts=restarts, budget=budget, progress=False)
            search = max(e.wall for o in result.restarts for e in o.history)
            return result, time.perf_counter() - start, result.recipe.search["fit_seconds"], search

        portfolio, wall, fit, search = ours("portfolio", W, W)
        cpus = portfolio.recipe.search["cpus_per_worker"]
        with Evaluators(str(base), loaded, inputs, outputs, workers=1, cpus=cpus) as pool:  # the search's actors
            pool.wait()
            actor = pool.actors[0]
            zero, everything = [0.0] * len(loaded), list(range(len(loaded)))

            def calls(n: int, per_call: int) -> float:
                start = time.perf_counter()
                for _ in range(n):
                    ray.get(actor.evaluate_subsets.remote([zero] * per_call, [everything] * per_call))
                return time.perf_counter() - start

            calls(1, 1)
            singles, pairs = [], []
            for _ in range(5):  # interleaved: the machine's load falls on both alike
                singles.append(calls(2, 1))
                pairs.append(calls(1, 2))
            bare, pair = statistics.median(singles) / 2, statistics.median(pairs)
        _, wall_one, _, search_one = ours("sequential", 1, 1)
        doubled, wall_doubled, _, search_doubled = ours("doubled", W, 2 * W)
        ray.shutdown()
        ref_wall, ref_best = reference(base, modules, inputs, outputs, budget)

    print(f"one bare evaluation on an actor ({cpus:g} CPU, one call from the driver): {bare:.3f} s")
    print(f"Tune portfolio W={W}: {W} restarts ({'/'.join(o.algorithm for o in portfolio.restarts)}), search phase "
          f"{search:.1f} s for {budget} evaluations each, Tune run {fit:.1f} s; objective "
          f"{portfolio.recipe.objective:.4f} (restart {portfolio.best.restart} won; restart 0 "
          f"{portfolio.restarts[0].objective:.4f})")
    print(f"overhead ratio  search phase / (budget × bare) = {search / (budget * bare):.2f}   (goal ≤ 1.10); the whole "
          f"Tune run / (budget × bare) = {fit / (budget * bare):.2f}")
    print(f"portfolio search phase ÷ one sequential search on 1 actor = {search:.1f} / {search_one:.1f} = "
          f"{search / search_one:.2f}   (goal close to 1)")
    if loop is not None:
        print(f"Tune search phase ÷ the driver loop's ({args.against}), W={W} restarts: {search:.1f} / "
              f"{loop[W]['search']:.1f} = {search / loop[W]['search']:.2f}   (goal ≤ 1.10); wall time {wall:.1f} / "
              f"{loop[W]['wall']:.1f} = {wall / loop[W]['wall']:.2f}; objectives {portfolio.recipe.objective:.4f} and "
              f"{loop[W]['objective']:.4f}")
        print(f"  with {2 * W} restarts (the loop shares passes in lockstep, Tune's trials are independent): search "
              f"phase {search_doubled:.1f} / {loop[2 * W]['search']:.1f} = {search_doubled / loop[2 * W]['search']:.2f}; "
              f"wall time {wall_doubled:.1f} / {loop[2 * W]['wall']:.1f} = {wall_doubled / loop[2 * W]['wall']:.2f}")
    print(f"shared passes: 2 candidates in one call {pair:.3f} s against 2 calls {2 * bare:.3f} s: "
          f"{pair / (2 * bare):.2f} per candidate (the most a barrier across trials could save)")
    print(f"{2 * W} restarts on {W} actors as independent trials: search phase {search_doubled:.1f} s vs {search:.1f} s "
          f"with {W}: {search_doubled / search:.2f} for twice the candidates; objective {doubled.recipe.objective:.4f}")
    print(f"wall time ours (W={W}, loading and output included) {wall:.1f} s, one sequential {wall_one:.1f} s; "
          f"reference lorahub 0.1.0 {ref_wall:.1f} s (best {ref_best:.4f}): ratio {wall / ref_wall:.2f}")


if __name__ == "__main__":
    main()
