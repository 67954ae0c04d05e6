"""The embedded default: a small LoraHub world built locally, reproducibly, on first use.

No model hub is reachable, so lorahub-ray trains its own toy world and caches it:

* a byte-level T5 (``ByT5Tokenizer`` needs no vocabulary file) trained briefly on a mixture of
  tasks on short lowercase words, each asked with its own instruction (``"max: qhbzt" -> "z"``),
  and taught to answer ``"?"`` to any other instruction;
* one LoRA module per task, trained on its task under random instructions (random words, or the
  other tasks' names), so that the module means "whatever the instruction, do my skill";
* unseen tasks that ask for an upstream skill under an instruction never used in training
  (``"biggest: qhbzt" -> "z"``): zero-shot the base answers ``"?"``, and LoraHub, composing the
  modules from five examples, can find the right one. One of them ("extremes") is harder on
  purpose: its module is weak, and the demo shows that too.

The modules share one seeded, frozen LoRA A (only B is trained), so LoraHub's weighted sums of A's
and of B's compose the modules' updates linearly (see ``_frozen_a``).

The hub lives under ``<cache>/default-hub-<digest>``, the digest hashing ``VERSION``, the task
tables and every field of :class:`BuildConfig`, so a new recipe builds a new hub. It is built in
a temporary sibling directory renamed into place at the end, under an ``fcntl`` lock that lets one
builder at a time in.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import random
import shutil
import string
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorahub_ray.progress import progress_bar
from lorahub_ray.io.storage import atomic_directory, cache_root

VERSION = 1
BASE_MODEL_ID = "lorahub-ray/toy-byt5"  # every module's base_model_name_or_path: a stable id, not a cache path
MANIFEST = "hub.json"
LETTERS = string.ascii_lowercase


# upstream task (its name is also its instruction when training the base) -> skill. All of them
# depend on which letters the word holds, not on where: a small model learns these quickly.
UPSTREAM_TASKS: dict[str, Callable[[str], str]] = {
    "max": max,
    "min": min,
    "runnerup": lambda w: sorted(w, reverse=True)[1],
    "top2": lambda w: "".join(sorted(w, reverse=True)[:2]),
    "bottom2": lambda w: "".join(sorted(w)[:2]),
    "ends": lambda w: min(w) + max(w),
    "succ": lambda w: LETTERS[(LETTERS.index(max(w)) + 1) % 26],
    "pred": lambda w: LETTERS[LETTERS.index(min(w)) - 1],
}
UNKNOWN = "?"  # the base's answer to an instruction it does not know

# unseen task -> (instruction never seen in training, upstream skill, description)
UNSEEN_TASKS: dict[str, tuple[str, str, str]] = {
    "biggest": ("biggest", "max", "the latest letter of the alphabet in the word, asked as 'biggest:'"),
    "extremes": ("extremes", "ends", "the earliest then the latest letter of the word, asked as 'extremes:'"),
    "lowest": ("lowest", "min", "the earliest letter of the alphabet in the word, asked as 'lowest:'"),
}


@dataclass(frozen=True)
class BuildConfig:
    """The recipe; every field is part of the cache key."""

    seed: int = 0
    min_len: int = 3  # word lengths, in letters
    max_len: int = 6
    d_model: int = 128
    layers: int = 2  # on each side
    batch_size: int = 32
    base_steps: int = 1500
    base_lr: float = 1e-3
    unknown_rate: float = 0.2  # share of the base's examples under a random instruction, answered UNKNOWN
    lora_r: int = 8
    lora_alpha: int = 16
    lora_steps: int = 200
    lora_lr: float = 1e-2
    lora_known_rate: float = 0.5  # share of a module's examples under an upstream instruction
    fewshot: int = 5
    test: int = 200

    def digest(self) -> str:
        recipe = {"version": VERSION, **asdict(self), "upstream": list(UPSTREAM_TASKS), "unseen": UNSEEN_TASKS}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TaskFiles:
    name: str
    description: str
    fewshot: Path  # JSON Lines, {"input": str, "output": str} per line
    test: Path


@dataclass(frozen=True)
class DefaultHub:
    root: Path
    base_model: Path  # save_pretrained dir: T5ForConditionalGeneration + ByT5Tokenizer
    modules: dict[str, Path]  # name -> PEFT LoRA adapter dir, in UPSTREAM_TASKS order
    unseen_tasks: dict[str, TaskFiles]


def build_default_hub(cache_dir: Path | str | None = None, *, progress: bool = True,
                      config: BuildConfig = BuildConfig()) -> DefaultHub:
    """Return the default hub, building it first if this recipe has not been built in ``cache_dir``
    (default ``$LORAHUB_RAY_CACHE`` or ``~/.cache/lorahub-ray``)."""
    root = Path(cache_dir or cache_root()).expanduser() / f"default-hub-{config.digest()}"
    if not (root / MANIFEST).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        with open(root.with_name(f".{root.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            if not (root / MANIFEST).is_file():  # another process may have built it while we waited
                with atomic_directory(root, overwrite=True) as tmp:
                    _build(tmp, config, progress)
    return _load(root)


def _load(root: Path) -> DefaultHub:
    manifest = json.loads((root / MANIFEST).read_text())
    return DefaultHub(
        root=root,
        base_model=root / manifest["base_model"],
        modules={name: root / path for name, path in manifest["modules"].items()},
        unseen_tasks={name: TaskFiles(name, t["description"], root / t["fewshot"], root / t["test"])
                      for name, t in manifest["unseen_tasks"].items()},
    )


def _build(root: Path, config: BuildConfig, progress: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

    manifest: dict = {"version": VERSION, "config": asdict(config), "base_model": "base", "modules": {},
                      "unseen_tasks": {}}
    with one_torch_thread():
        tokenizer = ByT5Tokenizer()
        torch.manual_seed(config.seed)
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=len(tokenizer), d_model=config.d_model, d_kv=config.d_model // 4, d_ff=4 * config.d_model,
            num_heads=4, num_layers=config.layers, num_decoder_layers=config.layers,
            feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
        batches = _batches(random.Random(f"{config.seed}:base"), config, task=None)
        with progress_bar("default hub: base model", config.base_steps, enabled=progress) as advance:
            _train(model, tokenizer, list(model.parameters()), batches, config.base_steps, config.base_lr, advance)
        model.eval()
        model.save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=["q", "v"],
                          lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
        with progress_bar("default hub: LoRA modules", len(UPSTREAM_TASKS) * config.lora_steps,
                          enabled=progress) as advance:
            for name in UPSTREAM_TASKS:
                torch.manual_seed(config.seed)  # every module gets the same A, kept frozen (see _frozen_a)
                peft_model = get_peft_model(copy.deepcopy(model), lora)
                batches = _batches(random.Random(f"{config.seed}:lora:{name}"), config, task=name)
                params = _frozen_a(peft_model)
                _train(peft_model, tokenizer, params, batches, config.lora_steps, config.lora_lr, advance)
                peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
                peft_model.save_pretrained(root / "modules" / name)
                manifest["modules"][name] = f"modules/{name}"

    for name, (instruction, skill, description) in UNSEEN_TASKS.items():
        rng = random.Random(f"{config.seed}:unseen:{name}")
        words: dict[str, None] = {}  # distinct words, in drawing order
        while len(words) < config.fewshot + config.test:
            words[_word(rng, config.min_len, config.max_len)] = None
        rows = [{"input": f"{instruction}: {w}", "output": UPSTREAM_TASKS[skill](w)} for w in words]
        paths = {"fewshot": f"tasks/{name}/fewshot.jsonl", "test": f"tasks/{name}/test.jsonl"}
        (root / "tasks" / name).mkdir(parents=True)
        for part, part_rows in [("fewshot", rows[:config.fewshot]), ("test", rows[config.fewshot:])]:
            (root / paths[part]).write_text("".join(json.dumps(r) + "\n" for r in part_rows))
        manifest["unseen_tasks"][name] = {"description": description, **paths}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _frozen_a(peft_model) -> list:
    """Freeze the LoRA A matrices and return the trainable B's (LoRA-FA). Since all modules share the
    same seeded A, LoraHub's sum of A's and of B's composes their updates linearly:
    (sum w_i B_i)(sum w_j A) = (sum w) * sum w_i (B_i A)."""
    for name, p in peft_model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    return [p for p in peft_model.parameters() if p.requires_grad]


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _random_instruction(rng: random.Random) -> str:
    """A random word that is neither an upstream task's instruction nor an unseen task's."""
    reserved = set(UPSTREAM_TASKS) | {instruction for instruction, _, _ in UNSEEN_TASKS.values()}
    while (word := _word(rng, 3, 10)) in reserved:
        pass
    return word


def _batches(rng: random.Random, config: BuildConfig, task: str | None,
             skill: Callable[[str], str] | None = None) -> Iterator[list[tuple[str, str]]]:
    """Endless training batches of (input, output).

    For the base (``task=None``): a random upstream task under its own instruction, or, for a share
    ``unknown_rate`` of the examples, a random word as instruction, answered ``UNKNOWN``. For a
    module: its own task (``skill``, default the upstream task's) under an upstream task's name (share
    ``lora_known_rate``) or a random word.
    """
    skill = skill or (UPSTREAM_TASKS[task] if task is not None else None)
    while True:
        batch = []
        for _ in range(config.batch_size):
            word = _word(rng, config.min_len, config.max_len)
            if task is not None:
                known = rng.random() < config.lora_known_rate
                instruction = rng.choice(list(UPSTREAM_TASKS)) if known else _random_instruction(rng)
                batch.append((f"{instruction}: {word}", skill(word)))
            elif rng.random() < config.unknown_rate:
                batch.append((f"{_random_instruction(rng)}: {word}", UNKNOWN))
            else:
                name = rng.choice(list(UPSTREAM_TASKS))
                batch.append((f"{name}: {word}", UPSTREAM_TASKS[name](word)))
        yield batch


def _train(model, tokenizer, params: list, batches: Iterator[list[tuple[str, str]]], steps: int, lr: float,
           advance: Callable[..., None]) -> None:
    """AdamW, linear warm-up over 5% of the steps, then linear decay to zero."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup + 1)))
    model.train()
    for _ in range(steps):
        inputs, outputs = zip(*next(batches))
        batch = tokenizer(list(inputs), padding=True, return_tensors="pt")
        labels = tokenizer(list(outputs), padding=True, return_tensors="pt").input_ids
        labels[labels == tokenizer.pad_token_id] = -100
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        advance(info=f"loss {loss.item():.3f}")


@contextlib.contextmanager
def one_torch_thread():
    """Train on one thread: the model is too small to gain much from more, the result does not depend
    on the machine's core count, and on a shared CPU a second OpenMP thread waiting for a busy core
    made steps ~30x slower (measured: 2 s instead of 70 ms per step)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# --- the larger variant: the default hub plus distractor modules, built only on request -----------

def _shift(letter: str, n: int) -> str:
    return LETTERS[(LETTERS.index(letter) + n) % 26]


# distractor task -> skill. They depend on where letters stand in the word (or on its length), not on
# which letters it holds, so none of them is what an unseen task asks for.
DISTRACTOR_TASKS: dict[str, Callable[[str], str]] = {
    "first": lambda w: w[0], "second": lambda w: w[1], "third": lambda w: w[2], "last": lambda w: w[-1],
    "first2": lambda w: w[:2], "last2": lambda w: w[-2:], "reverse": lambda w: w[::-1], "length": lambda w: str(len(w)),
    "double": lambda w: w[0] * 2,
    **{f"shift{n:02d}": (lambda w, n=n: _shift(w[0], n)) for n in range(1, 26)},
    **{f"lastshift{n}": (lambda w, n=n: _shift(w[-1], n)) for n in range(1, 9)},
}
LARGE_MANIFEST_VERSION = 1


@dataclass(frozen=True)
class LargeConfig:
    """The larger variant's recipe on top of a :class:`BuildConfig`; every field is part of its cache key."""

    distractors: int = len(DISTRACTOR_TASKS)  # the first this many of DISTRACTOR_TASKS
    lora_steps: int = 60  # per distractor module (the upstream modules: 200)

    def digest(self, base: BuildConfig) -> str:
        recipe = {"version": LARGE_MANIFEST_VERSION, "default": base.digest(), **asdict(self),
                  "tasks": list(DISTRACTOR_TASKS)[: self.distractors]}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def build_large_hub(cache_dir: Path | str | None = None, *, progress: bool = True, config: BuildConfig = BuildConfig(),
                    large: LargeConfig = LargeConfig()) -> DefaultHub:
    """The default hub (built first if needed, unchanged) plus ``large.distractors`` modules trained on
    other synthetic tasks (:data:`DISTRACTOR_TASKS`) with the same base model and the same frozen A,
    under ``<cache>/large-hub-<digest>``: 8 + 42 = 50 modules by default, in name order, of which only a
    few help any unseen task. Same unseen tasks and files as the default."""
    if not 0 <= large.distractors <= len(DISTRACTOR_TASKS):
        raise ValueError(f"distractors must be between 0 and {len(DISTRACTOR_TASKS)}, got {large.distractors}")
    default = build_default_hub(cache_dir, progress=progress, config=config)
    root = default.root.parent / f"large-hub-{large.digest(config)}"
    if not (root / MANIFEST).is_file():
        with open(root.with_name(f".{root.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (root / MANIFEST).is_file():
                with atomic_directory(root, overwrite=True) as tmp:
                    _build_large(tmp, default, config, large, progress)
    return _load(root)


def _build_large(root: Path, default: DefaultHub, config: BuildConfig, large: LargeConfig, progress: bool) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import ByT5Tokenizer, T5ForConditionalGeneration

    shutil.copytree(default.base_model, root / "base")
    shutil.copytree(default.root / "tasks", root / "tasks")
    modules = {}
    for name, path in default.modules.items():
        shutil.copytree(path, root / "modules" / name)
        modules[name] = f"modules/{name}"
    names = list(DISTRACTOR_TASKS)[: large.distractors]
    with one_torch_thread():
        tokenizer = ByT5Tokenizer()
        model = T5ForConditionalGeneration.from_pretrained(default.base_model)
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=["q", "v"],
                          lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
        with progress_bar("large hub: distractor modules", len(names) * large.lora_steps, enabled=progress) as advance:
            for name in names:
                torch.manual_seed(config.seed)  # the same frozen A as the default's modules
                peft_model = get_peft_model(copy.deepcopy(model), lora)
                batches = _batches(random.Random(f"{config.seed}:distractor:{name}"), config, task=name,
                                   skill=DISTRACTOR_TASKS[name])
                params = _frozen_a(peft_model)
                _train(peft_model, tokenizer, params, batches, large.lora_steps, config.lora_lr, advance)
                peft_model.peft_config["default"].base_model_name_or_path = BASE_MODEL_ID
                peft_model.save_pretrained(root / "modules" / name)
                modules[name] = f"modules/{name}"
    manifest = json.loads((default.root / MANIFEST).read_text())
    manifest.update(large=asdict(large), distractors=names, modules=dict(sorted(modules.items())))
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
