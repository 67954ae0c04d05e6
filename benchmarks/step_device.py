"""A search step against the like-for-like pass on one device, a GPU where there is one: the two ratios of
docs/step-cost.md there, and the step time at the Flan-T5-large shape (issue 25's GPU figures).

Each world is a model of random weights in a real model's shape (the time depends on the shapes, not the values),
with K=20 random LoRA modules written once to a temporary folder and loaded as every run loads modules
(``lorahub_ray.load_modules``, ``LoraComposer``, ``FewShotObjective``):

  flan-t5-base    T5, 768 wide, 12 + 12 layers; rank-16 modules on q and v      (benchmarks/core.py's shape)
  smollm2         Llama, 576 wide, 30 layers (SmolLM2-135M); rank-8 modules on q_proj and v_proj (causal.py's)
  flan-t5-large   T5, 1024 wide, 24 + 24 layers; rank-16 modules on q and v     (the paper's model)

Tokens are bytes (ByT5's tokenizer, offline), and the 5 examples are cut to about the token counts of core.py and
causal.py (about 64 and 54 tokens an example). For each world, --repeat rounds in a shuffled order of: the step
(each adapted layer on the path the rule picks), the step with every layer unmerged and with every layer merged,
the like-for-like pass (the objective's loss code on a copy of the base model without LoRA), compose alone and one
read of the stacked modules; on a GPU every call is timed between two ``torch.cuda.synchronize()``. It prints the
medians and the ratios to the like-for-like pass (goal <= 1.02).

Needs torch, transformers, peft and this package, not nevergrad, Ray or the reference, so a GPU image's Python runs
it from a checkout: ``PYTHONPATH=. python3 benchmarks/step_device.py --device cuda``.
Usage: python benchmarks/step_device.py [--device cpu|cuda] [--worlds flan-t5-base,smollm2,flan-t5-large] [--repeat N]
"""

from __future__ import annotations

import argparse
import copy
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")

from common import EXAMPLES, FLAN_T5_BASE, parts_line, randomize_lora, step_runs  # noqa: E402

K = 20
T5_LARGE = {**FLAN_T5_BASE, "d_model": 1024, "d_ff": 2816, "num_layers": 24, "num_decoder_layers": 24, "num_heads": 16}
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)
WORLDS = {  # name: (family, shape, rank, targets, bytes an input is cut to)
    "flan-t5-base": ("t5", FLAN_T5_BASE, 16, ["q", "v"], 64),
    "smollm2": ("llama", SMOLLM2, 8, ["q_proj", "v_proj"], 48),
    "flan-t5-large": ("t5", T5_LARGE, 16, ["q", "v"], 64),
}
LONG = [e["input"] + " Give the answer alone, with no other words before or after it, please." for e in EXAMPLES]


def build(name: str, root: Path, device: str):
    """The base model of ``name`` on ``device``, a copy of it for the like-for-like pass, and the K module folders."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    family, shape, rank, targets, _ = WORLDS[name]
    torch.manual_seed(0)
    if family == "t5":
        model = T5ForConditionalGeneration(T5Config(**shape))
        task = "SEQ_2_SEQ_LM"
    else:
        model = LlamaForCausalLM(LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, pad_token_id=0))
        task = "CAUSAL_LM"
    model.eval()
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, task_type=task,
                                                  init_lora_weights=False))
    folders = []
    for i in range(K):
        randomize_lora(peft_model)
        folders.append(str(root / name / f"module-{i:02d}"))
        peft_model.save_pretrained(folders[-1])
    model = peft_model.unload().to(device)  # the base model again, without the LoRA layers
    bare = copy.deepcopy(model)
    for p in bare.parameters():  # as a freshly loaded model: PEFT froze them, and a frozen output projection
        p.requires_grad_(True)   # runs the logits slice as a slower bmm (docs/step-cost.md)
    return model, bare, folders


def measure(name: str, device: str, repeat: int, root: Path) -> None:
    import torch
    from transformers import ByT5Tokenizer

    import lorahub_ray as lr
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.objective import FewShotObjective, token_losses

    cut = WORLDS[name][4]
    model, bare, folders = build(name, root, device)
    composer = LoraComposer(model, lr.load_modules(folders))
    objective = FewShotObjective(composer, ByT5Tokenizer(), [text[:cut] for text in LONG],
                                 [e["output"] for e in EXAMPLES], batch_size=5)
    batch = objective.batches[0]
    weights = [0.05 * (j % 7 - 3) for j in range(K)]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def like():  # the objective's own loss code, on the base model without LoRA
        sums, counts = token_losses(bare, batch)
        return float(sums.sum() / counts.sum())

    runs = {**step_runs(objective, weights, batch), "like": like, "compose": lambda: composer.compose(weights)}
    times = {run: [] for run in runs}
    order = list(runs)
    with torch.inference_mode():
        for i in range(repeat + 1):  # round 0 warms up
            random.Random(i).shuffle(order)
            for run in order:
                sync()
                start = time.perf_counter()
                runs[run]()
                sync()
                if i:
                    times[run].append(time.perf_counter() - start)
        runs["step"]()
    med = {run: statistics.median(v) for run, v in times.items()}
    paired = statistics.median(s / b for s, b in zip(times["step"], times["like"]))
    tokens = batch["attention_mask"].sum(1).tolist()
    print(f"\n{name} on {device}: K={K} rank-{WORLDS[name][2]} modules on {', '.join(WORLDS[name][3])}; "
          f"5 examples, input tokens {tokens}; median of {repeat} rounds")
    print(f"    search step {med['step'] * 1e3:.2f} ms, like-for-like loss on the base {med['like'] * 1e3:.2f} ms "
          f"(ratio {med['step'] / med['like']:.3f}; per round {paired:.3f}; of the fastest of each "
          f"{min(times['step']) / min(times['like']):.3f})   (goal <= 1.02)")
    print(f"    the step's paths: chosen per layer (merged {composer.merged_layers()} of {len(composer.keys) // 2} "
          f"layers) {med['step'] * 1e3:.2f} ms, all unmerged {med['unmerged'] * 1e3:.2f} ms (ratio "
          f"{med['unmerged'] / med['like']:.3f}), all merged {med['merged'] * 1e3:.2f} ms (ratio "
          f"{med['merged'] / med['like']:.3f})")
    print(parts_line(med["step"], med["compose"], med["read_stack"], med["like"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when there is one)")
    parser.add_argument("--worlds", default=",".join(WORLDS), help="comma-separated, of: " + ", ".join(WORLDS))
    parser.add_argument("--repeat", type=int, default=31, help="interleaved rounds")
    args = parser.parse_args()
    import torch
    from transformers.utils import logging

    logging.set_verbosity_error()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    worlds = [w.strip() for w in args.worlds.split(",") if w.strip()]
    unknown = [w for w in worlds if w not in WORLDS]
    if unknown:
        parser.error(f"unknown world(s) {', '.join(unknown)}; known: {', '.join(WORLDS)}")
    what = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({what}); torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    with tempfile.TemporaryDirectory(prefix="lorahub-step-") as root:
        for name in worlds:
            measure(name, device, args.repeat, Path(root))


if __name__ == "__main__":
    main()
