"""Shared set-up for the benchmarks: a randomly initialised model shaped like Flan-T5-base and
K random rank-r LoRA modules on q and v, written to a directory once and reused."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

FLAN_T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                    num_heads=12, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)

EXAMPLES = [
    {"input": "Question: which is larger, 37 or 73? Answer with the number.", "output": "73"},
    {"input": "Reverse the word 'lantern' letter by letter.", "output": "nretnal"},
    {"input": "Is the sentence 'the cat sat on the mat' grammatical? yes or no", "output": "yes"},
    {"input": "Sort these letters alphabetically: d b c a", "output": "a b c d"},
    {"input": "What is the capital of France? Answer in one word.", "output": "Paris"},
]


def build_world(root: Path, *, k: int = 20, r: int = 16, seed: int = 0) -> dict:
    """Write the base model, K modules and the examples under ``root`` (skipped when already there)."""
    from peft import LoraConfig, get_peft_model
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    root = Path(root)
    base, hub, examples = root / "base", root / "hub", root / "examples.jsonl"
    if not (root / "done").exists():
        torch.manual_seed(seed)
        model = T5ForConditionalGeneration(T5Config(**FLAN_T5_BASE))
        model.save_pretrained(base)
        ByT5Tokenizer().save_pretrained(base)
        config = LoraConfig(r=r, lora_alpha=32, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM",
                            init_lora_weights=False)
        peft_model = get_peft_model(model, config)
        for i in range(k):
            randomize_lora(peft_model)
            peft_model.save_pretrained(hub / f"module-{i:02d}")
        examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
        (root / "done").touch()
    return {"base": base, "modules": sorted(str(p) for p in hub.iterdir()), "examples": examples}


def randomize_lora(peft_model, std: float = 0.02) -> None:
    """Fill every LoRA matrix of ``peft_model`` with N(0, std²) draws from torch's generator: one random module,
    to be saved with ``save_pretrained``."""
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * std)


def timeit(fn, *, repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_runs(objective, weights, batch) -> dict:
    """The passes of the composed model that the step benchmarks time (docs/step-cost.md): one search step with
    ``weights`` on each path of its adapted layers (``step``: chosen per layer, ``unmerged``, ``merged``), and
    ``read_stack``, one read of the stacked modules (``torch.sum``): the floor of a compose, which reads them once."""
    composer = objective.composer

    def step(path):
        def run():
            composer.merge_into_weights = path
            objective(weights)
        return run

    return {"step": step("auto"), "unmerged": step("never"), "merged": step("always"),
            "read_stack": lambda: float(composer.stacked.sum())}


def parts_line(step: float, compose: float, read_stack: float, like: float) -> str:
    """The step above the like-for-like pass, in two parts: compose (against its floor, one read of the stack) and
    the rest, the adapted layers' low-rank work with the wrapper's per-call cost (the step minus compose minus the
    like-for-like pass). Times in seconds, medians of the same rounds."""
    rest = step - compose - like
    return (f"    the step's parts above the like-for-like pass: compose {compose * 1e3:.1f} ms ({compose / like:.1%}; "
            f"its floor, one read of the stacked modules, {read_stack * 1e3:.1f} ms), the rest (the adapted layers' "
            f"low-rank work and the wrapper) {rest * 1e3:.1f} ms ({rest / like:.1%})")


def default_root() -> Path:
    return Path(os.environ.get("LORAHUB_RAY_BENCH_DIR", Path.home() / ".cache" / "lorahub-ray" / "bench-flan-t5-base"))


def draws_of(task, draws: int):
    """For an unseen task of the embedded default: its few-shot examples and test set, then ``draws - 1`` other
    5-example draws from the test set (the d-th: test rows 5(d-1)..5d-1), each scored on the rest of the test set."""
    from lorahub_ray.io.examples import Examples, read_examples

    fewshot, test = read_examples(str(task.fewshot)), read_examples(str(task.test))
    yield fewshot, test
    for d in range(1, draws):
        lo, hi = 5 * (d - 1), 5 * d
        yield (Examples(test.inputs[lo:hi], test.outputs[lo:hi], f"{task.test} rows {lo}-{hi - 1}"),
               Examples(test.inputs[:lo] + test.inputs[hi:], test.outputs[:lo] + test.outputs[hi:],
                        f"{task.test} without rows {lo}-{hi - 1}"))


def run_against(checkout: str, script: str, args: dict, timeout: float) -> dict:
    """Run ``script`` (Python code that prints ``RESULT <json>``) with another checkout of the package first on the
    path, in its own process (and so its own Ray), and return the JSON it printed."""
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(Path(checkout).resolve()))
    done = subprocess.run([sys.executable, "-c", script, json.dumps(args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"the run with {checkout} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))
