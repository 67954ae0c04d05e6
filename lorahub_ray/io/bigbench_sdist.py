"""BIG-bench's task files, fetched once from the PyPI sdist ``bigbench==1.0.0`` and extracted by name.

The sdist (358 MB) holds ``bigbench/benchmark_tasks/<task>/task.json`` for the JSON tasks, with
subtask folders (``<task>/<subtask>/task.json``), and ``task.py`` for the programmatic ones. It is
downloaded once with pip (``pip download --no-deps --no-build-isolation``; pip builds its metadata,
so the environment needs ``setuptools`` and ``wheel``) into :func:`sdist_dir`, and only the members
of the tasks asked for are extracted, streaming through the archive once (``tarfile``, by name),
into ``<cache>/bigbench/tasks/<task>/``. The first pass also writes ``index.json``: every task in
the sdist, and whether it has JSON data, so that an unknown task is an error without a pass.

``$LORAHUB_RAY_BIGBENCH`` names the folder that holds (or receives) the sdist, so that several
users or caches can share one download; by default it is ``<cache>/bigbench``. It may instead name a
BIG-bench tree: a checkout of the BIG-bench repository or an unpacked sdist, i.e. a folder holding
``bigbench/benchmark_tasks/`` (or ``benchmark_tasks/`` itself). Its tasks are then read in place, with
nothing downloaded or extracted. (PyPI stopped serving ``bigbench==1.0.0``: on 2026-12-04 it listed only
0.0.1, which holds no task data. A copy of the 1.0.0 sdist or a checkout is then the way in.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from lorahub_ray.errors import DataError, did_you_mean
from lorahub_ray.io import storage

VERSION = "1.0.0"
SDIST = f"bigbench-{VERSION}.tar.gz"
TASKS_MARKER = "benchmark_tasks/"
INDEX_FILE = "index.json"
COMPLETE = ".complete"


def sdist_dir() -> Path:
    return Path(os.environ.get("LORAHUB_RAY_BIGBENCH") or storage.cache_root() / "bigbench").expanduser()


def tasks_dir() -> Path:
    return storage.cache_root() / "bigbench" / "tasks"


def tree_dir() -> Path | None:
    """The ``benchmark_tasks`` folder of a BIG-bench tree that ``$LORAHUB_RAY_BIGBENCH`` names, else None."""
    named = os.environ.get("LORAHUB_RAY_BIGBENCH")
    if not named:
        return None
    root = Path(named).expanduser()
    for candidate in (root / "bigbench" / TASKS_MARKER, root / TASKS_MARKER):
        if candidate.is_dir():
            return candidate
    return None


def _tree_index(tree: Path) -> dict[str, bool]:
    """Every task of a BIG-bench tree, and whether it has JSON data (as :func:`read_index`)."""
    index = {}
    for folder in sorted(p for p in tree.iterdir() if p.is_dir()):
        if (folder / "task.json").is_file() or any(folder.glob("*/task.json")):
            index[folder.name] = True
        elif (folder / "task.py").is_file():
            index[folder.name] = False
    return index


def sdist_path(*, fetch: bool = True) -> Path:
    """The sdist, downloaded with pip first when it is not there yet (and ``fetch``)."""
    path = sdist_dir() / SDIST
    if path.is_file():
        return path
    if not fetch:
        raise DataError(f"the BIG-bench sdist is not at {path}")
    return fetch_sdist()


def fetch_sdist() -> Path:
    """``pip download --no-deps --no-build-isolation bigbench==1.0.0`` into :func:`sdist_dir`."""
    target = sdist_dir()
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "--quiet",
               f"bigbench=={VERSION}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / SDIST
        if done.returncode != 0 or not got.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DataError(f"could not download bigbench=={VERSION} with pip into {target} "
                            f"({' / '.join(tail) or 'no output'}); it needs network access to PyPI, "
                            f"`pip install setuptools wheel`, and a PyPI that still serves {VERSION}. Else put "
                            f"{SDIST} there yourself, or set $LORAHUB_RAY_BIGBENCH to a BIG-bench checkout "
                            f"(a folder holding bigbench/benchmark_tasks/)")
        os.replace(got, target / SDIST)
    return target / SDIST


def _task_of(member: str) -> tuple[str, str] | None:
    """``(task, path inside the task)`` of a sdist member under ``benchmark_tasks/``, else None."""
    if TASKS_MARKER not in member:
        return None
    rest = member.split(TASKS_MARKER, 1)[1]
    if "/" not in rest:
        return None
    task, inner = rest.split("/", 1)
    return task, inner


def read_index() -> dict[str, bool] | None:
    """Every task and whether it has JSON data: of the BIG-bench tree if one is named, else of the sdist as
    its first extraction recorded it (None before that)."""
    tree = tree_dir()
    if tree is not None:
        return _tree_index(tree)
    path = tasks_dir() / INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def unknown_task(task: str, index: dict[str, bool], where: str = f"bigbench=={VERSION}") -> DataError:
    if task in index and not index[task]:
        return DataError(f"BIG-bench task '{task}' is programmatic (a task.py, no task.json) in {where}: it has no "
                         f"examples to read (BBH generated its own for boolean_expressions, multistep_arithmetic "
                         f"and web_of_lies)")
    hint = did_you_mean(task, [t for t, has in index.items() if has])
    return DataError(f"no BIG-bench task '{task}' in {where} ({sum(index.values())} JSON tasks){hint}")


def extract_tasks(tasks: list[str]) -> dict[str, Path]:
    """Every ``task.json`` of ``tasks`` (with their subtasks) extracted into :func:`tasks_dir`, in one
    streaming pass through the sdist for those not extracted yet; returns ``{task: directory}``. With a
    BIG-bench tree (:func:`tree_dir`), the tasks' own folders there, checked, and nothing extracted."""
    tree = tree_dir()
    if tree is not None:
        for t in tasks:
            if not any((tree / t).glob("**/task.json")):
                raise unknown_task(t, _tree_index(tree), where=str(tree))
        return {t: tree / t for t in tasks}
    root = tasks_dir()
    todo = sorted({t for t in tasks if not (root / t / COMPLETE).is_file()})
    index = read_index()
    if index is not None:
        for t in todo:
            if not index.get(t):
                raise unknown_task(t, index)
    if todo:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
        try:
            found: dict[str, bool] = {}
            with tarfile.open(sdist_path(), "r|gz") as archive:
                for member in archive:
                    where = _task_of(member.name)
                    if where is None or not member.isfile():
                        continue
                    task, inner = where
                    if inner.endswith("task.json"):
                        found[task] = True
                        if task in todo:
                            dest = staging / task / inner
                            dest.parent.mkdir(parents=True, exist_ok=True)
                            with archive.extractfile(member) as src, open(dest, "wb") as out:
                                shutil.copyfileobj(src, out)
                    elif inner.endswith("task.py"):
                        found.setdefault(task, False)
            storage.write_text(root / INDEX_FILE, json.dumps(dict(sorted(found.items())), indent=0) + "\n")
            for t in todo:
                if not found.get(t):
                    raise unknown_task(t, found)
                (staging / t / COMPLETE).write_text("")
                if not (root / t / COMPLETE).is_file():
                    shutil.rmtree(root / t, ignore_errors=True)  # a half-written earlier attempt
                    os.replace(staging / t, root / t)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return {t: root / t for t in tasks}


def task_dir(task: str) -> Path:
    """The extracted folder of one BIG-bench task (extracting it first if needed)."""
    return extract_tasks([task])[task]
