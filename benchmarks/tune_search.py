"""Distributed search on Ray Tune against one bare forward pass and against the reference ``lorahub`` 0.1.0.

A Flan-T5-base-shaped random model (d_model 768, 12+12 layers), K=20 rank-16 LoRA modules, 5 examples,
budget 40, all built offline. Printed as ratios measured side by side in one run:

* orchestration overhead: wall time of the search × W ÷ (evaluations × one bare objective evaluation on
  an actor), goal ≤ 1.10 (loading excluded: the search phase only);
* our wall time (loading included, Ray start excluded) ÷ the reference's, goal ≤ 0.5 with W=2;
* the objective we reach within the reference's wall time against the reference's final objective;
* what parallel asks cost: the same search with 1 ask at a time;
* more asks than actors: 2·W asks, each actor's share evaluated in shared forward passes.

Run: ``python benchmarks/tune_search.py [--workers 2] [--budget 40]`` from the repository root.
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

    from helpers import EXAMPLES
    from lorahub_ray.cluster.tune_search import lorahub_learning_ray

    inputs = [e["input"] for e in EXAMPLES]
    outputs = [e["output"] for e in EXAMPLES]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, modules = build(root, args.modules, args.rank)
        print(f"model: T5 d_model 768, 12+12 layers; {args.modules} rank-{args.rank} modules; 5 examples; "
              f"budget {args.budget}; {os.cpu_count()} cores", flush=True)
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)

        def ours(name: str, asks: int | None):
            events = []
            start = time.perf_counter()
            result = lorahub_learning_ray(str(base), [str(m) for m in modules], (inputs, outputs),
                                          output=root / name, workers=args.workers, budget=args.budget, asks=asks,
                                          progress=False, callback=lambda e: events.append((time.perf_counter(), e)))
            wall = time.perf_counter() - start
            return result, wall, [(t - start, e["best"]) for t, e in events]

        parallel, wall, curve = ours("parallel", None)
        # one bare objective evaluation, on an actor with the same resources as the search's
        from lorahub_ray.cluster.evaluators import Evaluator
        from lorahub_ray.core.modules import load_modules

        class TimedEvaluator(Evaluator):
            """The search's evaluator, timing one bare objective evaluation where it runs."""

            def forward_seconds(self, repeats: int) -> float:
                weights = [0.0] * self.objective.composer.num_modules
                self.objective(weights)
                start = time.perf_counter()
                for _ in range(repeats):
                    self.objective(weights)
                return (time.perf_counter() - start) / repeats

        loaded = load_modules([str(m) for m in modules])
        cpus = parallel.recipe.search["cpus_per_worker"]
        actor = ray.remote(TimedEvaluator).options(num_cpus=cpus).remote(
            str(base), loaded, inputs, outputs, loss="reference", batch_size=None,
            regularizer=__import__("lorahub_ray").l1_regularization, device="cpu", threads=max(1, int(cpus)))
        bare = ray.get(actor.forward_seconds.remote(5))
        ray.kill(actor)
        search_wall = max(e.wall for t in parallel.trials for e in t.history)
        evaluations = sum(len(t.history) for t in parallel.trials)
        sequential, wall_seq, _ = ours("sequential", 1)
        doubled, wall_doubled, _ = ours("doubled", 2 * args.workers)
        doubled_search = max(e.wall for t in doubled.trials for e in t.history)
        ray.shutdown()
        ref_wall, ref_best, ref_curve = reference(base, modules, inputs, outputs, args.budget)
        ours_at_ref = min((b for t, b in curve if t <= ref_wall), default=float("nan"))

    W = args.workers
    print(f"one bare evaluation on an actor ({cpus:g} CPU): {bare:.3f} s")
    print(f"search phase {search_wall:.1f} s for {evaluations} evaluations on W={W} "
          f"({parallel.recipe.algorithm}, {parallel.recipe.search['asks_per_trial']} asks)")
    print(f"overhead ratio  wall×W/(evaluations×bare) = {search_wall * W / (evaluations * bare):.2f}   (goal ≤ 1.10)")
    print(f"ours (W={W}, loading included) {wall:.1f} s: first evaluation reported at {curve[0][0]:.1f} s, last at "
          f"{curve[-1][0]:.1f} s; reference lorahub 0.1.0 {ref_wall:.1f} s: first at {ref_curve[0][0]:.1f} s")
    print(f"wall-time ratio ours/reference = {wall / ref_wall:.2f}   (goal ≤ 0.5)")
    print(f"objective within the reference's wall time: ours {ours_at_ref:.4f} vs reference final {ref_best:.4f} "
          f"(ratio {ours_at_ref / ref_best:.3f}, goal ≤ 1)")
    print(f"parallel asks: W={W} final {parallel.recipe.objective:.4f} in {wall:.1f} s; 1 ask at a time "
          f"({sequential.recipe.algorithm}) final {sequential.recipe.objective:.4f} in {wall_seq:.1f} s "
          f"(quality ratio {parallel.recipe.objective / sequential.recipe.objective:.3f}, "
          f"time ratio {wall / wall_seq:.2f})")
    print(f"{2 * W} asks on {W} actors ({doubled.recipe.algorithm}; each actor's 2 candidates share forward passes): "
          f"search phase {doubled_search:.1f} s vs {search_wall:.1f} s with {W} asks (ratio "
          f"{doubled_search / search_wall:.2f}); final {doubled.recipe.objective:.4f}")


if __name__ == "__main__":
    main()
