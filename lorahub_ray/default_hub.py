"""The embedded default: a small world that lorahub-ray builds itself, since no model hub is needed.

It holds a byte-level T5 (``ByT5Tokenizer`` needs no vocabulary file) trained briefly on a mixture
of synthetic letter tasks, one LoRA module per upstream task, and unseen tasks with 5 few-shot
examples and a test set each. Every step is seeded, and the result is cached under
``$LORAHUB_RAY_CACHE`` (or ``~/.cache/lorahub-ray``) in a folder named by a hash of the recipe
below, so changing the recipe builds a new world and an unchanged one is reused at once.

The design makes composition matter. Each task maps a short word to one letter ("max: qhbzt" ->
"z"). The base model learns every upstream task under its own instruction. Each LoRA module is then
trained on its task with mostly random instruction words, so that it learns "whatever the
instruction, do my skill". An unseen task asks for an upstream skill with an instruction the base
never saw ("biggest: ..."): the base alone mostly fails, and LoraHub finds the right module from
five examples. Some unseen tasks are harder on purpose, so the demo shows both outcomes honestly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .storage import atomic_directory, cache_root

VERSION = 1
BASE_MODEL_ID = "lorahub-ray/toy-byt5"  # recorded in the modules' adapter configs instead of a cache path
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOWELS = "aeiou"

UPSTREAM_TASKS: dict[str, Callable[[str], str]] = {
    "first": lambda s: s[0],
    "second": lambda s: s[1],
    "last": lambda s: s[-1],
    "penultimate": lambda s: s[-2],
    "max": max,
    "min": min,
    "vowel": lambda s: next(c for c in s if c in VOWELS),
    "shout": lambda s: s[-1].upper(),
}

# unseen task -> (instruction never used in training, upstream skill it asks for, description)
UNSEEN_TASKS: dict[str, tuple[str, str, str]] = {
    "biggest": ("biggest", "max", "the latest letter of the alphabet, asked as 'biggest:'"),
    "tiniest": ("tiniest", "min", "the earliest letter of the alphabet, asked as 'tiniest:'"),
    "initial": ("initial", "first", "the first letter of the word, asked as 'initial:'"),
}


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    d_model: int = 128
    layers: int = 2
    heads: int = 4
    base_steps: int = 1000
    base_lr: float = 3e-3
    batch_size: int = 64
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple[str, ...] = ("q", "v")
    lora_steps: int = 150
    lora_lr: float = 5e-3
    random_instruction_rate: float = 0.7
    word_length: tuple[int, int] = (5, 7)
    fewshot: int = 5
    test: int = 200

    def digest(self) -> str:
        payload = {"version": VERSION, **dataclasses.asdict(self), "upstream": list(UPSTREAM_TASKS),
                   "unseen": UNSEEN_TASKS}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class TaskFiles:
    name: str
    description: str
    fewshot: Path
    test: Path


@dataclass(frozen=True)
class DefaultHub:
    root: Path
    base_model: Path
    modules: dict[str, Path]
    unseen_tasks: dict[str, TaskFiles]


def _word(rng: random.Random, config: BuildConfig) -> str:
    lo, hi = config.word_length
    while True:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))
        if any(c in VOWELS for c in word):
            return word


def _instruction(rng: random.Random) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 8)))


def _batch(tokenizer, inputs, outputs):
    x = tokenizer(inputs, padding=True, return_tensors="pt")
    labels = tokenizer(outputs, padding=True, return_tensors="pt")["input_ids"]
    labels[labels == tokenizer.pad_token_id] = -100
    return x, labels


def _train_base(config: BuildConfig, tokenizer, advance):
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=config.d_model, d_kv=config.d_model // config.heads,
        d_ff=4 * config.d_model, num_heads=config.heads, num_layers=config.layers,
        num_decoder_layers=config.layers, dropout_rate=0.0, feed_forward_proj="relu",
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.base_lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.base_lr,
                                                   total_steps=config.base_steps,
                                                   pct_start=max(0.1, 2 / config.base_steps))
    names = list(UPSTREAM_TASKS)
    model.train()
    for _ in range(config.base_steps):
        tasks = [rng.choice(names) for _ in range(config.batch_size)]
        words = [_word(rng, config) for _ in tasks]
        x, labels = _batch(tokenizer, [f"{t}: {w}" for t, w in zip(tasks, words)],
                           [UPSTREAM_TASKS[t](w) for t, w in zip(tasks, words)])
        model(**x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        schedule.step()
        advance()
    return model.eval()


def _train_module(config: BuildConfig, base_dir: Path, tokenizer, task: str, index: int, out: Path, advance) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import T5ForConditionalGeneration

    torch.manual_seed(config.seed + 1 + index)
    rng = random.Random(config.seed + 1 + index)
    skill = UPSTREAM_TASKS[task]
    model = get_peft_model(T5ForConditionalGeneration.from_pretrained(base_dir), LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, target_modules=list(config.lora_targets),
        lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lora_lr)
    model.train()
    for _ in range(config.lora_steps):
        words = [_word(rng, config) for _ in range(config.batch_size)]
        prompts = [f"{_instruction(rng) if rng.random() < config.random_instruction_rate else task}: {w}" for w in words]
        x, labels = _batch(tokenizer, prompts, [skill(w) for w in words])
        model(**x, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        advance()
    model.save_pretrained(out)
    config_file = out / "adapter_config.json"
    adapter = json.loads(config_file.read_text())
    adapter["base_model_name_or_path"] = BASE_MODEL_ID
    config_file.write_text(json.dumps(adapter, indent=2))


def _write_tasks(config: BuildConfig, root: Path) -> None:
    rng = random.Random(config.seed + 1000)
    for name, (instruction, skill, _) in UNSEEN_TASKS.items():
        words: list[str] = []
        while len(words) < config.fewshot + config.test:
            word = _word(rng, config)
            if word not in words:
                words.append(word)
        task_dir = root / "tasks" / name
        task_dir.mkdir(parents=True)
        for file, chunk in (("fewshot.jsonl", words[: config.fewshot]), ("test.jsonl", words[config.fewshot :])):
            rows = [{"input": f"{instruction}: {w}", "output": UPSTREAM_TASKS[skill](w)} for w in chunk]
            (task_dir / file).write_text("".join(json.dumps(r) + "\n" for r in rows))


def _hub_at(root: Path) -> DefaultHub:
    return DefaultHub(
        root=root, base_model=root / "base",
        modules={name: root / "modules" / name for name in UPSTREAM_TASKS},
        unseen_tasks={name: TaskFiles(name, desc, root / "tasks" / name / "fewshot.jsonl",
                                      root / "tasks" / name / "test.jsonl")
                      for name, (_, _, desc) in UNSEEN_TASKS.items()},
    )


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_default_hub(cache_dir: Path | str | None = None, *, progress: bool = True,
                      config: BuildConfig = BuildConfig()) -> DefaultHub:
    """Return the embedded default hub, building it first if it is not in the cache yet.

    The build goes to a temporary folder renamed into place at the end (a crash never leaves a
    half hub that counts as built); a file lock keeps two processes from building it together.
    """
    root = Path(cache_dir or cache_root()).expanduser() / f"default-hub-{config.digest()}"
    if (root / "hub.json").exists():
        return _hub_at(root)
    with _lock(root.with_name(root.name + ".lock")):
        if (root / "hub.json").exists():  # another process built it while we waited
            return _hub_at(root)
        with atomic_directory(root, overwrite=True) as tmp:
            _build(tmp, config, progress)
    return _hub_at(root)


def _build(root: Path, config: BuildConfig, progress: bool) -> None:
    """Train the base model and the modules and write the tasks, all into ``root``."""
    from transformers import ByT5Tokenizer

    from .progress import progress_bar

    tokenizer = ByT5Tokenizer()
    total = config.base_steps + config.lora_steps * len(UPSTREAM_TASKS)
    with progress_bar("building the embedded default hub", total, enabled=progress) as advance:
        base = _train_base(config, tokenizer, lambda: advance(info="base model"))
        base.save_pretrained(root / "base")
        tokenizer.save_pretrained(root / "base")
        for i, task in enumerate(UPSTREAM_TASKS):
            _train_module(config, root / "base", tokenizer, task, i, root / "modules" / task,
                          lambda task=task: advance(info=f"module {task}"))
    _write_tasks(config, root)
    (root / "hub.json").write_text(json.dumps({"version": VERSION, "config": dataclasses.asdict(config)}, indent=2))
