"""BIG-bench task files as a task source (:mod:`.sources`): few-shot examples and test sets.

A source is one of
    ``bigbench:TASK`` or ``bigbench:TASK/SUBTASK``   a task of the ``bigbench==1.0.0`` sdist (fetched once
                                                      and extracted by name, see :mod:`.bigbench_sdist`);
    ``path/to/task.json``                             one BIG-bench task file;
    ``path/to/task_dir``                              a folder with a ``task.json`` (and subtask folders);
each optionally followed by ``?split=fewshot|test&seed=N&shots=K&format=F&size=M`` (the split options are
every source's, :mod:`.sources`; the CLI's ``--split`` and ``--split-seed`` write split and seed). A task whose
top ``task.json`` has no examples is the union of its subtasks (``<task>/<subtask>/task.json``), as BIG-bench
scores it.

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

Splits (:mod:`.sources`)
    The examples are shuffled with the seed; ``fewshot`` is the first ``shots`` (5) of them, ``test``
    the rest, without any example whose question and options equal a few-shot one, capped at 250 (as
    BBH's test sets) or at ``size``. The same seed gives the same split on any machine; the two never overlap.

This is *not* BBH: BBH's own 250-example sets are the ``bbh:`` source (:mod:`.bbh`). A malformed task file
is an error that names the file and the example's index.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lorahub_ray.errors import DataError
from lorahub_ray.io import bigbench_sdist, storage
from lorahub_ray.io.splits import DEFAULT_SHOTS, LETTERS, SPLITS, TEST_SIZE, Item, Scheme, Source  # noqa: F401

SCHEME = "bigbench:"
TASK_FILE = "task.json"
FORMATS = ("auto", "generate", "choice")


class BigBench(Scheme):
    prefix, label, folder = SCHEME, "BIG-bench", "bigbench"
    options = ("format",)
    formats = FORMATS

    def claims(self, location: str) -> bool:
        return is_bigbench(location)

    def check(self, source: Source) -> None:
        if source.location.startswith(SCHEME) and not source.location[len(SCHEME):].strip("/"):
            raise DataError(f"{source.location}: name a task, as bigbench:TASK or bigbench:TASK/SUBTASK")

    def prepare(self, sources: list[Source]) -> None:
        tasks = sorted({_sdist_task(s.location) for s in sources if s.location.startswith(SCHEME)})
        if tasks:
            bigbench_sdist.extract_tasks(tasks)  # one pass through the sdist for all of them

    def name(self, source: Source) -> str:
        return task_files(source.location)[0]

    def items(self, source: Source) -> list[Item]:
        return [item for f in task_files(source.location)[1] for item in parse_task(f, source.format)]

    def fingerprint(self, source: Source) -> bytes:
        digest = hashlib.sha256()
        for f in task_files(source.location)[1]:
            digest.update(hashlib.sha256(Path(f).read_bytes()).digest())
        return digest.digest()


BIGBENCH = BigBench()


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


def _sdist_task(location: str) -> str:
    return location[len(SCHEME):].strip("/").split("/")[0]


def sdist_task(uri) -> str | None:
    """The sdist task a ``bigbench:TASK[/SUBTASK][?...]`` source names (``TASK``); ``None`` for a path."""
    location = str(uri).split("?", 1)[0]
    return _sdist_task(location) if location.startswith(SCHEME) else None


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


