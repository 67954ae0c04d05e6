"""BIG-Bench Hard as its authors released it, as a task source (:mod:`.sources`): ``bbh:TASK``.

The release (Suzgun et al., 2022; MIT) is 27 files ``bbh/<task>.json``, each
``{"canary": ..., "examples": [{"input": ..., "target": ...}, ...]}`` (6,511 examples: 250 per task, fewer for
causal_judgement, penguins_in_a_table and snarks). The inputs and targets are used exactly as released
(a multiple-choice input already lists its options), so accuracies are comparable with published BBH numbers.

Where the files come from
    ``$LORAHUB_RAY_BBH`` names a folder that holds the release: its root (with ``bbh/`` inside) or the
    ``bbh/`` folder itself, as a local path, an ``s3://`` prefix or an ``https://`` prefix. Unset, it is
    the authors' repository (:data:`RELEASE_URL`). A remote release is downloaded once, all 27 files
    (:func:`download`), into ``<cache>/bbh/release/<hash of the URL>/``; a local one is read in place.

Splits (:mod:`.sources`)
    As the paper draws its few-shot examples (the reference's ``reproduce_bbh.py``: ``random.seed(42)``, then
    ``random.shuffle`` of the task's examples and the first 5): the split seed defaults to :data:`PAPER_SEED`
    and seeds ``random.Random(seed)`` directly, so ``bbh:navigate`` gives the examples the reference's draw
    gives from the same list. The test set is every other example (245 of 250; none repeats a few-shot
    question), capped at ``size``. ``?seed=N`` draws another five.

An unknown task is an error with close matches; a malformed file is an error that names the file and the
example's index; a release that cannot be downloaded is an error that names the URL and says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lorahub_ray.errors import DataError, did_you_mean
from lorahub_ray.io import storage
from lorahub_ray.io.splits import Item, Scheme, Source

SCHEME = "bbh:"
ENV = "LORAHUB_RAY_BBH"
RELEASE_URL = "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main"
PAPER_SEED = 42  # reproduce_bbh.py: random.seed(42); random.shuffle(examples); examples[:5]
COMPLETE = ".complete"
TASKS = (
    "boolean_expressions", "causal_judgement", "date_understanding", "disambiguation_qa", "dyck_languages",
    "formal_fallacies", "geometric_shapes", "hyperbaton", "logical_deduction_five_objects",
    "logical_deduction_seven_objects", "logical_deduction_three_objects", "movie_recommendation",
    "multistep_arithmetic_two", "navigate", "object_counting", "penguins_in_a_table",
    "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
    "sports_understanding", "temporal_sequences", "tracking_shuffled_objects_five_objects",
    "tracking_shuffled_objects_seven_objects", "tracking_shuffled_objects_three_objects", "web_of_lies",
    "word_sorting",
)


def release() -> str:
    """Where the release is: ``$LORAHUB_RAY_BBH``, else the authors' repository."""
    return os.environ.get(ENV) or RELEASE_URL


def task_dir() -> Path:
    """The local folder of the ``<task>.json`` files: the release itself if it is local, else its copy in
    the cache (downloaded first if needed)."""
    root = release()
    if storage.is_remote(root):
        return download(root)
    path = Path(root.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise DataError(f"${ENV}={root}: no such folder (name the BBH release: its root, with bbh/ inside, or its "
                        f"bbh/ folder)")
    return path / "bbh" if (path / "bbh").is_dir() else path


def _fetch(url: str) -> bytes | None:
    """The bytes at ``url`` (``None`` if there is no such file); other failures are one line naming it."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
        return fs.cat_file(path)  # one GET: a 404 is FileNotFoundError, a refused connection is not
    except FileNotFoundError:
        return None
    except Exception as exc:  # no network, refused connection, forbidden bucket: all the same to the user
        raise DataError(f"could not download the BBH release from {url} ({type(exc).__name__}: {exc}); set "
                        f"${ENV} to a folder that holds it (its root, with bbh/ inside, or its bbh/ folder), local, "
                        f"s3:// or https://") from None


def cache_dir(root: str) -> Path:
    """Where the release at the remote ``root`` is kept once downloaded."""
    return storage.cache_root() / "bbh" / "release" / hashlib.sha256(root.encode()).hexdigest()[:16]


def download(root: str) -> Path:
    """All 27 task files of the release at ``root`` (``bbh/<task>.json`` under it, or ``<task>.json``),
    downloaded once into the cache (written whole, then moved into place); returns their folder."""
    dest = cache_dir(root)
    if (dest / COMPLETE).is_file():
        return dest
    base = root.rstrip("/")
    first = None
    for prefix in (f"{base}/bbh", base):
        first = _fetch(f"{prefix}/{TASKS[0]}.json")
        if first is not None:
            break
    if first is None:
        raise DataError(f"no BBH release at {root}: neither {base}/bbh/{TASKS[0]}.json nor {base}/{TASKS[0]}.json "
                        f"exists; set ${ENV} to a folder that holds the release")
    with storage.atomic_directory(dest, overwrite=True) as staging:  # the cache's own folder: replaced whole
        (staging / f"{TASKS[0]}.json").write_bytes(first)
        for task in TASKS[1:]:
            data = _fetch(f"{prefix}/{task}.json")
            if data is None:
                raise DataError(f"the BBH release at {root} has no {prefix}/{task}.json")
            (staging / f"{task}.json").write_bytes(data)
        (staging / "SOURCE").write_text(prefix + "\n")
        (staging / COMPLETE).write_text("")
    return dest


def task_file(task: str) -> Path:
    if task not in TASKS:
        hint = did_you_mean(task, TASKS)
        raise DataError(f"no BBH task '{task}' (BBH has {len(TASKS)} tasks){hint}")
    path = task_dir() / f"{task}.json"
    if not path.is_file():
        raise DataError(f"{path}: no such file (the BBH release named by ${ENV}={release()} lacks task '{task}')")
    return path


def parse_file(path: Path) -> list[Item]:
    """Every example of one ``<task>.json``, checked (errors name the file and the example's index)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    examples = data.get("examples") if isinstance(data, dict) else None
    if not isinstance(examples, list) or not examples:
        raise DataError(f"{path}: a BBH file is an object whose 'examples' is a non-empty list")
    items = []
    for i, ex in enumerate(examples):
        where = f"{path}, example {i}"
        if not isinstance(ex, dict):
            raise DataError(f"{where}: expected an object, got {type(ex).__name__}")
        for field in ("input", "target"):
            if not isinstance(ex.get(field), str) or not ex[field].strip():
                raise DataError(f"{where}: '{field}' must be a non-empty string")
        items.append(Item(ex["input"], target=ex["target"]))
    return items


class Release(Scheme):
    prefix, label, folder = SCHEME, "BBH", "bbh"
    default_seed = PAPER_SEED

    def _task(self, source: Source) -> str:
        return source.location[len(SCHEME):].strip("/")

    def check(self, source: Source) -> None:
        task = self._task(source)
        if task not in TASKS:
            task_file(task)  # the error with close matches

    def prepare(self, sources: list[Source]) -> None:
        task_dir()  # a remote release: all 27 files at once

    def name(self, source: Source) -> str:
        return self._task(source)

    def items(self, source: Source) -> list[Item]:
        return parse_file(task_file(self._task(source)))

    def fingerprint(self, source: Source) -> bytes:
        return hashlib.sha256(task_file(self._task(source)).read_bytes()).digest()

    def order_seed(self, seed: int):
        return seed  # random.Random(42).shuffle is the reference's random.seed(42); random.shuffle


BBH = Release()
