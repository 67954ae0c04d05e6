"""BIG-bench task files as a source of few-shot examples and test sets.

A source is one of
    ``bigbench:TASK`` or ``bigbench:TASK/SUBTASK``   a task of the ``bigbench==1.0.0`` sdist (fetched once
                                                      and extracted by name, see :mod:`.bigbench_sdist`);
    ``path/to/task.json``                             one BIG-bench task file;
    ``path/to/task_dir``                              a folder with a ``task.json`` (and subtask folders);
each optionally followed by ``?split=fewshot|test&seed=N&shots=K&format=F&size=M`` (the CLI's
``--split`` and ``--split-seed`` write split and seed). A task whose top ``task.json`` has no examples is the union of its
subtasks (``<task>/<subtask>/task.json``), as BIG-bench scores it.

Examples
    *Generative* (``input``/``target``): the pair ``(input, target)``; a list of targets keeps its
    first. *Multiple choice* (``input``/``target_scores``): a BBH-style prompt, the question, then
    ``Options:`` and one ``(A) option`` line per option, whose answer is the letter of the best-scored
    option, ``(A)``, as BBH writes it. An example with both (arithmetic's, which pads its options
    with words such as "banana") is multiple choice by default (``format=auto``, as BBH's
    geometric_shapes and temporal_sequences); ``format=generate`` keeps its ``target`` instead, and
    ``format=choice`` requires options everywhere. BIG-bench often lists the correct option first (99% of
    date_understanding), so the options are **shuffled**, seeded by the split seed and the example's
    index. Every input starts with the task's ``task_prefix`` and ``example_input_prefix``.

Splits
    The examples are shuffled with the seed; ``fewshot`` is the first ``shots`` (5) of them, ``test``
    the rest, without any example whose question and options equal a few-shot one, capped at 250 (as
    BBH's test sets) or at ``size``. A hub trained on a task uses ``shots`` as its training set
    (:func:`train_shots`), so that its ``test`` split stays held out. The same seed gives the same split on any machine; the two never overlap.

A malformed task file is an error that names the file and the example's index.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs

from lorahub_ray.errors import DataError
from lorahub_ray.io import bigbench_sdist, storage

SCHEME = "bigbench:"
TASK_FILE = "task.json"
SPLITS = ("fewshot", "test")
FORMATS = ("auto", "generate", "choice")
DEFAULT_SHOTS = 5
TEST_SIZE = 250
FORMAT_VERSION = 1  # of the materialised split files; bump when the formatting changes
LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Item:
    """One parsed example: a generative ``target``, or ``options`` with the index of the correct one."""

    input: str
    target: str | None = None
    options: tuple[str, ...] | None = None
    correct: int | None = None

    @property
    def key(self) -> tuple:
        """What makes two examples the same question (the option order aside)."""
        return (self.input, tuple(sorted(self.options)) if self.options else self.target)


@dataclass(frozen=True)
class Source:
    location: str  # bigbench:TASK[/SUBTASK] or a path
    split: str
    seed: int = 0
    shots: int = DEFAULT_SHOTS
    format: str = "auto"
    size: int = TEST_SIZE  # the test split's cap

    @property
    def uri(self) -> str:
        extra = "".join(f"&{k}={v}" for k, v, default in (("format", self.format, "auto"),
                                                           ("size", self.size, TEST_SIZE)) if v != default)
        return f"{self.location}?split={self.split}&seed={self.seed}&shots={self.shots}{extra}"


# --- sources ---------------------------------------------------------------------------------------


def is_bigbench(uri) -> bool:
    """Whether ``uri`` names a BIG-bench source (``bigbench:...``, a ``task.json`` or a task folder)."""
    text = str(uri)
    if text.startswith(SCHEME):
        return True
    base = text.split("?", 1)[0]
    if storage.is_remote(base):
        return False
    path = Path(base).expanduser()
    return path.name == TASK_FILE or (path.is_dir() and (path / TASK_FILE).is_file())


def parse_source(uri, *, default_split: str = "fewshot") -> Source:
    text = str(uri)
    location, _, query = text.partition("?")
    params = parse_qs(query, keep_blank_values=True, strict_parsing=False) if query else {}
    unknown = sorted(set(params) - set(OPTIONS))
    if unknown:
        raise DataError(f"{text}: unknown option(s) {', '.join(unknown)}; a BIG-bench source takes "
                        f"{', '.join(OPTIONS)}")

    def one(name, default):
        values = params.get(name)
        return values[-1] if values else default

    split = one("split", default_split)
    if split not in SPLITS:
        raise DataError(f"{text}: split must be one of {', '.join(SPLITS)}, got '{split}'")
    fmt = one("format", "auto")
    if fmt not in FORMATS:
        raise DataError(f"{text}: format must be one of {', '.join(FORMATS)}, got '{fmt}'")
    try:
        seed, shots, size = int(one("seed", 0)), int(one("shots", DEFAULT_SHOTS)), int(one("size", TEST_SIZE))
    except ValueError:
        raise DataError(f"{text}: seed, shots and size must be integers") from None
    if shots < 1 or size < 1:
        raise DataError(f"{text}: shots and size must be at least 1, got {shots} and {size}")
    if location.startswith(SCHEME) and not location[len(SCHEME):].strip("/"):
        raise DataError(f"{text}: name a task, as bigbench:TASK or bigbench:TASK/SUBTASK")
    return Source(location, split, seed, shots, fmt, size)


OPTIONS = ("split", "seed", "shots", "format", "size")


def sdist_task(uri) -> str | None:
    """The sdist task a ``bigbench:TASK[/SUBTASK][?...]`` source names (``TASK``); ``None`` for a path."""
    location = parse_source(uri).location
    return location[len(SCHEME):].strip("/").split("/")[0] if location.startswith(SCHEME) else None


def with_split(uri, split: str | None = None, seed: int | None = None, **options):
    """``uri`` with ``split``, ``seed`` and any other of :data:`OPTIONS` set if it is a BIG-bench source
    (what is not given is kept, so an unset split still takes its reader's default); other sources are
    returned unchanged."""
    given = {k: v for k, v in {"split": split, "seed": seed, **options}.items() if v is not None}
    if uri is None or not given or not is_bigbench(uri):
        return uri
    location, _, query = str(uri).partition("?")
    params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()} if query else {}
    params.update({k: str(v) for k, v in given.items()})
    text = location + "?" + "&".join(f"{k}={v}" for k, v in params.items())
    parse_source(text)  # checks split, seed and any other option now
    return text


def task_files(location: str) -> tuple[str, list[Path]]:
    """The task's display name (``task`` or ``task_subtask``, as BBH names subtasks) and its files."""
    if location.startswith(SCHEME):
        name = location[len(SCHEME):].strip("/")
        task, _, sub = name.partition("/")
        folder = bigbench_sdist.task_dir(task)
        if sub:
            folder = folder / sub
            if not (folder / TASK_FILE).is_file():
                subs = sorted(p.parent.name for p in folder.parent.glob(f"*/{TASK_FILE}"))
                raise DataError(f"BIG-bench task '{task}' has no subtask '{sub}'; its subtasks: "
                                f"{', '.join(subs) or 'none'}")
        return _folder_files(folder, display=name.replace("/", "_"))
    path = Path(location).expanduser()
    if path.is_file():
        parent = path.parent
        sub = (parent.parent / TASK_FILE).is_file()
        return (f"{parent.parent.name}_{parent.name}" if sub else parent.name), [path]
    if path.is_dir() and (path / TASK_FILE).is_file():
        sub = (path.parent / TASK_FILE).is_file()
        return _folder_files(path, display=f"{path.parent.name}_{path.name}" if sub else path.name)
    raise DataError(f"{location}: no such BIG-bench task file or folder (a {TASK_FILE} or a folder holding one)")


def _folder_files(folder: Path, *, display: str) -> tuple[str, list[Path]]:
    top = folder / TASK_FILE
    if _load_json(top).get("examples"):
        return display, [top]
    subs = sorted(folder.glob(f"*/{TASK_FILE}"))
    if not subs:
        raise DataError(f"{top}: no examples, and no subtask folders with a {TASK_FILE}")
    return display, subs


# --- parsing ---------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: a BIG-bench task file is a JSON object, got {type(data).__name__}")
    return data


def _prefix(data: dict, key: str, path: Path) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise DataError(f"{path}: '{key}' must be a string, got {type(value).__name__}")
    return value


def parse_task(path: Path, format: str = "auto") -> list[Item]:
    """Every example of one ``task.json``, checked (errors name the file and the example index); see
    the module's docstring for ``format``."""
    data = _load_json(path)
    examples = data.get("examples")
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{path}: 'examples' must be a non-empty list")
    lead = (_prefix(data, "task_prefix", path) + _prefix(data, "example_input_prefix", path)).lstrip()
    items = []
    for i, ex in enumerate(examples):
        where = f"{path}, example {i}"
        if not isinstance(ex, dict):
            raise DataError(f"{where}: expected an object, got {type(ex).__name__}")
        text = ex.get("input")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'input' must be a non-empty string")
        text = (lead + text).strip()
        if format == "choice" and "target_scores" not in ex:
            raise DataError(f"{where}: no 'target_scores', so it cannot be multiple choice (format=choice)")
        if format == "generate" and "target" not in ex:
            raise DataError(f"{where}: no 'target', so it cannot be generative (format=generate)")
        if "target_scores" in ex and format != "generate":
            items.append(_choice(ex["target_scores"], text, where))
        elif "target" in ex:
            target = ex["target"]
            if isinstance(target, list) and target and all(isinstance(t, str) for t in target):
                target = target[0]
            if not isinstance(target, str):
                raise DataError(f"{where}: 'target' must be a string or a non-empty list of strings")
            items.append(Item(text, target=target))
        else:
            raise DataError(f"{where}: neither 'target' nor 'target_scores'")
    return items


def _choice(scores, text: str, where: str) -> Item:
    if not isinstance(scores, dict) or len(scores) < 2:
        raise DataError(f"{where}: 'target_scores' must map at least two options to scores")
    if len(scores) > len(LETTERS):
        raise DataError(f"{where}: {len(scores)} options; at most {len(LETTERS)} can be lettered (A)-(Z)")
    for option, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise DataError(f"{where}: the score of option '{option}' must be a number, got {score!r}")
    options = tuple(scores)
    best = max(range(len(options)), key=lambda j: scores[options[j]])  # the first of equal bests
    return Item(text, options=options, correct=best)


def format_item(item: Item, rng: random.Random) -> tuple[str, str]:
    """``(input, output)``: generative as is; multiple choice as a BBH prompt with shuffled options."""
    if item.options is None:
        return item.input, item.target
    order = list(range(len(item.options)))
    rng.shuffle(order)
    lines = [f"({LETTERS[k]}) {item.options[j]}" for k, j in enumerate(order)]
    answer = LETTERS[order.index(item.correct)]
    return item.input + "\nOptions:\n" + "\n".join(lines), f"({answer})"


# --- splits ----------------------------------------------------------------------------------------


def split_indices(items: list[Item], split: str, seed: int, shots: int, where: str,
                  size: int = TEST_SIZE) -> list[int]:
    if len(items) <= shots:
        raise DataError(f"{where}: {len(items)} examples, too few for {shots} few-shot examples and a test set")
    order = list(range(len(items)))
    random.Random(f"lorahub-ray bigbench split {seed}").shuffle(order)
    fewshot = order[:shots]
    if split == "fewshot":
        return fewshot
    seen = {items[i].key for i in fewshot}
    test = [i for i in order[shots:] if items[i].key not in seen][:size]
    if not test:
        raise DataError(f"{where}: every example repeats a few-shot one; no test set is left")
    return test


@dataclass(frozen=True)
class Split:
    name: str  # the task's display name
    inputs: list[str]
    outputs: list[str]
    files: tuple[Path, ...]


def load_split(uri, *, default_split: str = "fewshot") -> Split:
    """The examples of one split of a BIG-bench source (see the module's docstring)."""
    source = parse_source(uri, default_split=default_split)
    name, files = task_files(source.location)
    items = [item for f in files for item in parse_task(f, source.format)]
    chosen = split_indices(items, source.split, source.seed, source.shots, str(uri), source.size)
    inputs, outputs = [], []
    for i in chosen:
        x, y = format_item(items[i], random.Random(f"lorahub-ray bigbench options {source.seed} {i}"))
        inputs.append(x)
        outputs.append(y)
    return Split(name, inputs, outputs, tuple(files))


def materialize(uri, *, default_split: str = "test") -> Path:
    """The split written once as ``<cache>/bigbench/splits/<key>/<task>.jsonl`` (``input``/``output``),
    so that every reader of data files (Ray Data included) reads it as any other test set. The key
    hashes the task files' content, the split, seed and shots, and the format version."""
    source = parse_source(uri, default_split=default_split)
    split = load_split(source.uri)
    digest = hashlib.sha256(f"{FORMAT_VERSION} {source.split} {source.seed} {source.shots} {source.format} "
                            f"{source.size}".encode())
    for f in split.files:
        digest.update(hashlib.sha256(Path(f).read_bytes()).digest())
    path = storage.cache_root() / "bigbench" / "splits" / digest.hexdigest()[:16] / f"{split.name}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text("".join(json.dumps({"input": i, "output": o}) + "\n"
                               for i, o in zip(split.inputs, split.outputs)), encoding="utf-8")
        os.replace(tmp, path)
    return path


def count(uri) -> int:
    """How many examples the BIG-bench source ``uri`` holds (all splits), in its ``format``."""
    source = parse_source(uri)
    return sum(len(parse_task(f, source.format)) for f in task_files(source.location)[1])


def train_shots(uri, *, train_size: int, test_size: int) -> int:
    """The ``shots`` that make the ``fewshot`` split a training set of up to ``train_size`` examples
    while at least ``min(test_size, a fifth of the task)`` stay for the held-out ``test`` split."""
    n = count(uri)
    held_out = max(1, min(test_size, n // 5))
    shots = min(train_size, n - held_out)
    if shots < 1:
        raise DataError(f"{uri}: {n} examples, too few to train on and hold some out")
    return shots
