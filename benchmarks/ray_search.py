"""The Ray search (a portfolio of restarts in lockstep) against one bare evaluation, one sequential
search and the reference ``lorahub`` 0.1.0.

A Flan-T5-base-shaped random model (d_model 768, 12+12 layers), K=20 rank-16 LoRA modules, 5 examples,
budget 40 per restart, all built offline. Printed as ratios measured side by side in one run:

* orchestration overhead: search-phase wall time ÷ (rounds × the busiest actor's candidates per round ×
  one bare evaluation on an actor), goal ≤ 1.10;
* the portfolio's search phase (W restarts on W actors) ÷ one sequential search (1 restart, 1 actor):
  goal close to 1 (the portfolio buys more search, not more time);
* lockstep sharing: 2·W restarts on W actors (each actor's 2 candidates of a round in one call, sharing
  forward passes) ÷ W restarts, per round;
* our wall time (loading included, Ray start excluded) ÷ the reference's.

Run: ``python benchmarks/ray_search.py [--workers 2] [--budget 40]`` from the repository root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


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

    def traced(weights, *args, **kwargs):  # record (time, objective) to read the best-so-far curve
        value = original(weights, *args, **kwargs)
        best.append((time.perf_counter(), value))
        return value

    ref.get_score = traced
    start = time.perf_counter()
    try:
        ref.lorahub_learning([str(m) for m in modules], inputs, outputs, max_inference_step=budget,
                             model_name_or_path=str(base), batch_size=None, seed=42)
    finally:
        ref.get_score = original
    return time.perf_counter() - start, min(v for _, v in best), [(t - start, v) for t, v in best]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--budget", type=int, default=40)
    parser.add_argument("--modules", type=int, default=20)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import ray

    import lorahub_ray as lr
    from helpers import EXAMPLES
    from lorahub_ray.cluster.evaluators import Evaluator
    from lorahub_ray.cluster.ray_search import lorahub_learning_ray

    inputs = [e["input"] for e in EXAMPLES]
    outputs = [e["output"] for e in EXAMPLES]
    W = args.workers
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, modules = build(root, args.modules, args.rank)
        loaded = lr.load_modules([str(m) for m in modules])
        print(f"model: T5 d_model 768, 12+12 layers; {args.modules} rank-{args.rank} modules; 5 examples; "
              f"budget {args.budget} per restart; {os.cpu_count()} cores", flush=True)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)

        def ours(name: str, workers: int, restarts: int):
            start = time.perf_counter()
            result = lorahub_learning_ray(str(base), loaded, (inputs, outputs), output=root / name, workers=workers,
                                          restarts=restarts, budget=args.budget, progress=False)
            wall = time.perf_counter() - start
            search = max(e.wall for o in result.restarts for e in o.history)
            return result, wall, search

        portfolio, wall, search = ours("portfolio", W, W)
        cpus = portfolio.recipe.search["cpus_per_worker"]
        # one bare objective evaluation, on an actor with the same resources as the search's
        actor = ray.remote(Evaluator).options(num_cpus=cpus).remote(
            str(base), ray.put(loaded), inputs, outputs, loss="reference", batch_size=None,
            regularizer=lr.l1_regularization, device="cpu", threads=max(1, int(cpus)))
        zero, everything = [[0.0] * len(loaded)], [list(range(len(loaded)))]
        ray.get(actor.evaluate_subsets.remote(zero, everything))
        start = time.perf_counter()
        for _ in range(5):
            ray.get(actor.evaluate_subsets.remote(zero, everything))
        bare = (time.perf_counter() - start) / 5
        ray.kill(actor)
        _, wall_one, search_one = ours("sequential", 1, 1)
        doubled, _, search_doubled = ours("doubled", W, 2 * W)
        ray.shutdown()
        ref_wall, ref_best, _ = reference(base, modules, inputs, outputs, args.budget)

    rounds = args.budget
    print(f"one bare evaluation on an actor ({cpus:g} CPU, one call from the driver): {bare:.3f} s")
    print(f"portfolio W={W}: {W} restarts ({'/'.join(o.algorithm for o in portfolio.restarts)}), search phase "
          f"{search:.1f} s for {rounds} rounds; objective {portfolio.recipe.objective:.4f} (restart "
          f"{portfolio.best.restart} won; restart 0 {portfolio.restarts[0].objective:.4f})")
    print(f"overhead ratio  search / (rounds × bare) = {search / (rounds * bare):.2f}   (goal ≤ 1.10)")
    print(f"portfolio search phase ÷ one sequential search on 1 actor = {search:.1f} / {search_one:.1f} = "
          f"{search / search_one:.2f}   (goal close to 1)")
    print(f"lockstep sharing: {2 * W} restarts on {W} actors, search phase {search_doubled:.1f} s vs {search:.1f} s "
          f"with {W}: {search_doubled / search:.2f} for twice the candidates (2 per actor per round share passes); "
          f"objective {doubled.recipe.objective:.4f}")
    print(f"wall time ours (W={W}, loading and output included) {wall:.1f} s, one sequential {wall_one:.1f} s; "
          f"reference lorahub 0.1.0 {ref_wall:.1f} s (best {ref_best:.4f}): ratio {wall / ref_wall:.2f}")


if __name__ == "__main__":
    main()
