"""Sharded evaluation with Ray Data: examples per second against W, and Ray Data's overhead.

    python benchmarks/ray_data_eval.py [--examples N] [--base-examples N]

For two models (the embedded default's base model, or a tiny byte-level T5 standing in for it
when the default hub is not installed, and a randomly initialised Flan-T5-base-shaped T5), it
times in one run, end to end (model loading included):

* ``plain``: a plain in-process batched loop (lorahub_ray.evaluation.generate.generate in file order) on
  one thread, as one worker would run it;
* ``ray W=1`` and ``ray W=2``: ``evaluate_data(..., workers=W)`` on a private local Ray with
  2 CPUs (actors get 1 CPU with W=1, 0.5 with W=2 so that read tasks keep room);

and prints examples per second, the speed-up of W=2 over W=1, the overhead of Ray Data on
one worker against the plain loop (ray W=1 time / plain time; the goal is <= 1.15) and the
seconds Ray adds in all (ray W=1 time - plain time: mostly the actor's worker process importing
torch and transformers and loading the model, which the in-process loop has already paid).

The test sets are sized so that the plain loop takes some tens of seconds, as the large test
sets Ray Data is for; a first Ray run on a small file warms Ray up (worker processes, caches).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    words = ["abc", "ray", "lora", "hub", "xy", "hello", "data", "shard", "token", "model"]
    rows = []
    for _ in range(n):
        w = " ".join(rnd.choice(words) for _ in range(rnd.randint(1, 6)))
        rows.append({"input": f"reverse: {w}", "output": w[::-1]})
    return rows


def base_shaped(path: Path) -> Path:
    """Flan-T5-base's shape (d_model 768, 12+12 layers, 12 heads, gated-GELU d_ff 2048), random
    weights, with the byte-level tokenizer (no download)."""
    import torch
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    tok = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tok), d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                      num_heads=12, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0,
                      eos_token_id=1, tie_word_embeddings=False)
    T5ForConditionalGeneration(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def default_model(root: Path) -> tuple[str, Path]:
    try:
        from lorahub_ray.demo.world import build_default_hub

        return "embedded default", Path(build_default_hub(None).base_model)
    except ImportError:
        from helpers import make_base

        return "tiny T5 (stand-in for the embedded default)", make_base(root / "tiny", d_model=64)


def plain_loop(model_path: Path, inputs: list[str], batch_size: int, max_new_tokens: int) -> float:
    import torch

    from lorahub_ray.core.model import load_model
    from lorahub_ray.evaluation.generate import generate

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        model, tok = load_model(str(model_path), device="cpu")
        generate(model, tok, inputs, batch_size=batch_size, max_new_tokens=max_new_tokens)
        return time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)


def ray_run(model_path: Path, data: Path, workers: int, batch_size: int, max_new_tokens: int) -> float:
    from lorahub_ray.api import evaluate_data

    start = time.perf_counter()
    evaluate_data(str(model_path), str(data), workers=workers, cpus_per_worker=1.0 if workers == 1 else 0.5,
                  batch_size=batch_size, max_new_tokens=max_new_tokens, device="cpu", progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=60000, help="test rows for the embedded default")
    parser.add_argument("--base-examples", type=int, default=320, help="test rows for the Flan-T5-base-shaped model")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import ray
    from transformers.utils import logging as hf_logging

    from helpers import write_jsonl

    hf_logging.set_verbosity_error()
    root = Path(tempfile.mkdtemp(prefix="bench-ray-data-"))
    ray.init(address="local", num_cpus=2, num_gpus=0, logging_level="ERROR", log_to_driver=False,
             include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    name, tiny = default_model(root)
    cases = [(name, tiny, args.examples, 32, 16), ("Flan-T5-base-shaped", base_shaped(root / "base"),
                                                      args.base_examples, 16, 8)]
    figures = []
    for label, model_path, n, batch_size, max_new in cases:
        rows = make_rows(n)
        data = write_jsonl(root / f"{label.split()[0]}-test.jsonl", rows)
        inputs = [r["input"] for r in rows]
        warm = write_jsonl(root / f"{label.split()[0]}-warm.jsonl", make_rows(4 * batch_size, seed=1))
        ray_run(model_path, warm, 1, batch_size, max_new)  # warm-up: worker processes, caches
        plain = plain_loop(model_path, inputs, batch_size, max_new)
        w1 = ray_run(model_path, data, 1, batch_size, max_new)
        w2 = ray_run(model_path, data, 2, batch_size, max_new)
        fig = {"model": label, "examples": n, "batch_size": batch_size, "max_new_tokens": max_new,
               "plain_eps": n / plain, "ray_w1_eps": n / w1, "ray_w2_eps": n / w2,
               "speedup_w2_over_w1": w1 / w2, "overhead_ray_w1_over_plain": w1 / plain,
               "ray_w1_extra_seconds": w1 - plain}
        figures.append(fig)
        print(f"{label}: {n} examples, batch {batch_size}, {max_new} new tokens")
        print(f"  examples/s   plain loop {fig['plain_eps']:.1f} | ray W=1 {fig['ray_w1_eps']:.1f} | "
              f"ray W=2 {fig['ray_w2_eps']:.1f}")
        print(f"  W=2 / W=1 speed-up {fig['speedup_w2_over_w1']:.2f}x; "
              f"Ray Data overhead on one worker (ray W=1 time / plain time) {fig['overhead_ray_w1_over_plain']:.2f} "
              f"(goal <= 1.15); Ray adds {fig['ray_w1_extra_seconds']:.1f} s in all")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    ray.shutdown()


if __name__ == "__main__":
    main()
