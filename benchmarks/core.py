"""Core engine against the reference ``lorahub`` 0.1.0, on a Flan-T5-base-shaped random model with
K=20 rank-16 LoRA modules on q and v and 5 examples. Prints ratios measured in this one run:

(a) one search step (compose + forward) / one bare forward pass of the base model   goal <= 1.05
    (two bare passes: the plain ``model(**batch)`` that the reference and most users run, and the
    objective's own loss code on the base model, without the decoder's key/value cache and with one
    cross-entropy, as our step runs it: the like-for-like one, whose gap is compose + LoRA alone:
    goal <= 1.02). The step also runs with every adapted layer unmerged and with every one merged
    (``merge_into_weights``), to check the rule that picks a path per layer
(b) our load of the 20 modules / the reference's load                               goal <= 0.2
(d) candidates sharing forward passes (FewShotObjective.evaluate_many, as an evaluator actor runs
    the candidates a search asks at once): time per candidate / one search step alone
(e) a restart over a subset of a large hub (the paper's 20 of 196 modules): composing the subset
    from its own rows / composing the whole hub with zeros for the others (random tensors of the
    benchmark's LoRA shapes, caches flushed before each)
(c) peak memory of ours / the reference's, each in a fresh process that loads the base model,
    then loads the modules and runs 10 search steps: the peak RSS in all, and the peak above
    the RSS of the loaded base model (what the modules and the search add); ours also with every
    layer unmerged (the path before merged layers existed), to show what merged copies add

Needs the reference in the environment: pip install lorahub==0.1.0 datasets
Usage: python benchmarks/core.py [--root DIR] [--repeat N] [--threads N] [--clock wall|cpu]
On a busy machine, ``--threads 1 --clock cpu`` times the work (this process's CPU time) rather than the
share of the cores it got; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from common import EXAMPLES, build_world, default_root, parts_line, step_runs, timeit  # noqa: E402

INPUTS = [e["input"] for e in EXAMPLES]
OUTPUTS = [e["output"] for e in EXAMPLES]
STEPS = 10


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def ours(world, steps=STEPS, merge_into_weights="auto"):
    import lorahub_ray as lr
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.model import load_base_model
    from lorahub_ray.core.objective import FewShotObjective

    t0 = time.perf_counter()
    base, tok, _ = load_base_model(str(world["base"]), device="cpu")
    t1 = time.perf_counter()
    modules = lr.load_modules(world["modules"])
    composer = LoraComposer(base, modules, merge_into_weights=merge_into_weights)
    t2 = time.perf_counter()
    objective = FewShotObjective(composer, tok, INPUTS, OUTPUTS, batch_size=5)
    for i in range(steps):
        objective([0.1 * ((i + j) % 5 - 2) for j in range(len(modules))])
    return {"base_load": t1 - t0, "module_load": t2 - t1, "objective": objective, "tokenizer": tok}


def reference(world, steps=STEPS):
    from lorahub.algorithm import (default_get_loss, default_l1_regularization, get_score,
                                   load_base_model_and_lora_modules, load_dataset)

    t0 = time.perf_counter()
    model, tok, cache = load_base_model_and_lora_modules(world["modules"], str(world["base"]))
    t1 = time.perf_counter()
    dataset = load_dataset(INPUTS, OUTPUTS, tok)
    score = lambda w: get_score(w, model, cache, dataset, 5, default_get_loss, default_l1_regularization)  # noqa: E731
    for i in range(steps):
        score([0.1 * ((i + j) % 5 - 2) for j in range(len(cache))])
    return {"load": t1 - t0, "score": score}


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_rss_child(which: str, root: str, merge_into_weights: str) -> None:
    """Run in a fresh process: load the base model, then modules + STEPS steps; print peaks in MiB."""
    import torch

    _quiet()
    world = build_world(Path(root))
    from transformers import AutoModelForSeq2SeqLM

    from lorahub_ray.core.objective import tokenize_examples
    from transformers import AutoTokenizer

    base = AutoModelForSeq2SeqLM.from_pretrained(world["base"]).eval()
    with torch.inference_mode():  # touch every weight: from_pretrained may map the file lazily
        base(**tokenize_examples(AutoTokenizer.from_pretrained(world["base"]), INPUTS, OUTPUTS, batch_size=5)[0])
    total_peak = _status_mib("VmHWM")
    # both sides get this loaded base model instead of loading their own
    loader = type("Preloaded", (), {"from_pretrained": staticmethod(lambda *a, **k: base)})
    if which == "ours":
        import transformers  # lorahub_ray.core.model imports it from transformers when called

        transformers.AutoModelForSeq2SeqLM = loader
    else:
        import lorahub.algorithm

        lorahub.algorithm.AutoModelForSeq2SeqLM = loader
    after_base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    if which == "ours":
        ours(world, merge_into_weights=merge_into_weights)
    else:
        reference(world)
    peak = _status_mib("VmHWM")
    print(json.dumps({"peak": max(peak, total_peak), "above_base": peak - after_base}))


def peak_rss(which: str, root: Path, merge_into_weights: str = "auto") -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--root", str(root), "--merge-into-weights",
                          merge_into_weights], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def subset_compose(n: int, hub: int = 196, k: int = 20, repeat: int = 7) -> None:
    import torch

    from lorahub_ray.core.compose import linear

    print(f"\n(e) composing {k} of {hub} modules ({hub} x {n} stacked numbers; median of {repeat})")
    stacked, out = torch.randn(hub, n), torch.empty(n)
    subset = sorted(random.Random(1).sample(range(hub), k))
    weights = torch.randn(k)
    full = torch.zeros(hub)
    full[subset] = weights
    flush = torch.empty(512 * 2**20 // 4)  # more than the last-level cache

    def timed(fn) -> float:
        times = []
        for _ in range(repeat):
            flush.add_(1.0)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    own = timed(lambda: linear(weights, stacked, out, subset))
    zeros = timed(lambda: linear(full, stacked, out))
    print(f"    subset's own rows {own * 1e3:.1f} ms, whole hub with zeros {zeros * 1e3:.1f} ms, ratio {own / zeros:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=default_root())
    parser.add_argument("--child", choices=["ours", "reference"])
    parser.add_argument("--repeat", type=int, default=31, help="interleaved rounds of (a)")
    parser.add_argument("--load-repeat", type=int, default=3, help="interleaved rounds of (b)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (for a busy machine, with --threads 1)")
    parser.add_argument("--merge-into-weights", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_rss_child(args.child, str(args.root), args.merge_into_weights)
    import torch

    _quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def timed(fn, repeat=1, warmup=0):
        """Median of ``repeat`` calls of ``fn`` after ``warmup``, by ``--clock``."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeat):
            start = clock()
            fn()
            times.append(clock() - start)
        return statistics.median(times)

    print(f"torch threads: {torch.get_num_threads()}; clock: {args.clock}; load average {load_average()}; "
          f"building/reusing the model under {args.root} ...", flush=True)
    world = build_world(args.root)

    # (b) loading: a first round warms the imports and the page cache for both sides, then
    # --load-repeat rounds, interleaved, each side's median
    from lorahub_ray.core.model import load_base_model

    rounds = {"base": [], "modules": [], "reference": [], "bare_base": []}
    for i in range(args.load_repeat + 1):
        mine = ours(world, steps=0)
        theirs = reference(world, steps=0)
        bare_base = timeit(lambda: load_base_model(str(world["base"]), device="cpu"), repeat=1, warmup=0)
        if i:
            rounds["base"].append(mine["base_load"])
            rounds["modules"].append(mine["module_load"])
            rounds["reference"].append(theirs["load"])
            rounds["bare_base"].append(bare_base)
    load = {k: statistics.median(v) for k, v in rounds.items()}
    ref_modules = max(load["reference"] - load["bare_base"], 1e-9)

    # (a) search step against a bare forward of the base model, interleaved
    from transformers import AutoModelForSeq2SeqLM

    from lorahub_ray.core.objective import token_losses, tokenize_examples

    objective, tok = mine["objective"], mine["tokenizer"]
    bare = AutoModelForSeq2SeqLM.from_pretrained(world["base"]).eval()
    batches = tokenize_examples(tok, INPUTS, OUTPUTS, batch_size=5)
    weights = [0.05 * (j % 7 - 3) for j in range(20)]

    def bare_forward():
        with torch.inference_mode():
            return float(bare(**batches[0]).loss)

    def bare_forward_like_ours():  # the objective's own loss code, on the base model
        with torch.inference_mode():
            sums, counts = token_losses(bare, batches[0])
            return float(sums.sum() / counts.sum())

    composer = objective.composer
    runs = {"bare": bare_forward, "like_ours": bare_forward_like_ours, **step_runs(objective, weights, batches[0]),
            "compose": lambda: composer.compose(weights), "reference": lambda: theirs["score"](weights)}
    times = {name: [] for name in runs}
    order, shuffle = list(runs), random.Random(0).shuffle
    for _ in range(args.repeat):
        # interleaved so that drift hits every side alike, in an order shuffled every round so that
        # none of them always runs right after the same other one
        shuffle(order)
        for name in order:
            times[name].append(timed(runs[name]))
    runs["step"]()
    step_times, bare_times, like_times = times["step"], times["bare"], times["like_ours"]
    step_time, fwd, fwd_like, comp, ref_step = (statistics.median(times[name]) for name in
                                              ("step", "bare", "like_ours", "compose", "reference"))

    print(f"\n(b) loading 20 rank-16 modules (median of {args.load_repeat} rounds after a warm-up round)")
    print(f"    ours: base {load['base']:.2f}s + modules {load['modules']:.3f}s (load, hash, check, stack, wrap)")
    print(f"    reference: {load['reference']:.2f}s in all, of which ~{ref_modules:.2f}s modules "
          f"(all minus a bare base load of {load['bare_base']:.2f}s)")
    print(f"    ratio modules ours/reference: {load['modules'] / ref_modules:.3f}   (goal <= 0.2)")
    print(f"    ratio base+modules ours/reference: {(load['base'] + load['modules']) / load['reference']:.3f}")
    print("\n(a) one search step vs one bare forward pass (median of %d, interleaved)" % args.repeat)
    print(f"    bare forward {fwd * 1e3:.1f} ms, with the objective's loss code {fwd_like * 1e3:.1f} ms; our step "
          f"{step_time * 1e3:.1f} ms (compose alone {comp * 1e3:.2f} ms); reference step {ref_step * 1e3:.1f} ms")
    # the ratio of medians, of the fastest of each, and the median of the ratios within a round (the
    # passes of one round run within about two seconds, so slow drift of the machine cancels)
    paired = statistics.median(s / b for s, b in zip(step_times, bare_times))
    paired_like = statistics.median(s / b for s, b in zip(step_times, like_times))
    print(f"    ratio step/plain bare forward: {step_time / fwd:.3f}   (goal <= 1.05); of the fastest of each: "
          f"{min(step_times) / min(bare_times):.3f}; median within a round: {paired:.3f}")
    print(f"    ratio step/bare forward with the objective's loss code (like for like): {step_time / fwd_like:.3f}"
          f"   (goal <= 1.02); "
          f"of the fastest of each: {min(step_times) / min(like_times):.3f}; median within a round: {paired_like:.3f}")
    print(f"    ratio reference step/bare forward: {ref_step / fwd:.3f}")
    unmerged, merged = statistics.median(times["unmerged"]), statistics.median(times["merged"])
    print(f"    the step's paths: chosen per layer (merged {composer.merged_layers()} of {len(composer.keys) // 2} layers) "
          f"{step_time * 1e3:.1f} ms, all unmerged {unmerged * 1e3:.1f} ms (like for like {unmerged / fwd_like:.3f}), "
          f"all merged {merged * 1e3:.1f} ms (like for like {merged / fwd_like:.3f})")
    print(parts_line(step_time, comp, statistics.median(times["read_stack"]), fwd_like))
    rng = random.Random(0)
    print("\n(d) candidates sharing forward passes: time per candidate / one step alone (median of 5)")
    for count in (2, 4):
        candidates = [[rng.uniform(-1.5, 1.5) for _ in range(20)] for _ in range(count)]
        shared = timed(lambda: objective.evaluate_many(candidates), repeat=5, warmup=1) / count
        alone = timed(lambda: [objective(w) for w in candidates], repeat=5, warmup=1) / count
        print(f"    {count} candidates: {shared * 1e3:.1f} ms vs {alone * 1e3:.1f} ms each, ratio {shared / alone:.3f}")
    subset_compose(objective.composer.stacked.shape[1])
    del mine, theirs, objective, bare
    print("\n(c) peak memory, fresh process each, load + %d steps" % STEPS)
    rss_ours, rss_unmerged = peak_rss("ours", args.root), peak_rss("ours", args.root, "never")
    rss_ref = peak_rss("reference", args.root)
    print(f"    peak in all: ours {rss_ours['peak']:.0f} MiB, reference {rss_ref['peak']:.0f} MiB, "
          f"ratio {rss_ours['peak'] / rss_ref['peak']:.3f}")
    print(f"    peak above the loaded base: ours {rss_ours['above_base']:.0f} MiB, reference "
          f"{rss_ref['above_base']:.0f} MiB, ratio {rss_ours['above_base'] / rss_ref['above_base']:.3f}")
    print(f"    ours with every layer unmerged: peak in all {rss_unmerged['peak']:.0f} MiB, above the loaded base "
          f"{rss_unmerged['above_base']:.0f} MiB")
    print(f"\nload average at the end {load_average()}")


def load_average() -> str:
    return "(1, 5, 15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
