"""Task sources: a benchmark's or a generator's examples, split into few-shot examples and a test set.

Every reader of examples (``--examples``, ``--data``, :func:`lorahub_ray.io.examples.read_examples`,
the BBH table, the hub build) takes a *task source* as well as a data file. A source is one of

    ``bigbench:TASK[/SUBTASK]``, a ``task.json`` or a task folder   BIG-bench's task files (:mod:`.bigbench`);
    ``bbh:TASK``                                                     the BBH release (:mod:`.bbh`);
    ``reasoning-gym:NAME``                                           a reasoning-gym generator (:mod:`.reasoning_gym`);

each optionally followed by ``?OPTION=VALUE&...``. Every scheme takes the split options:

``split``  ``fewshot`` or ``test`` (by default ``fewshot`` where examples are read, ``test`` where data is);
``shots``  the size of the few-shot split (5, as the paper);
``seed``   the split seed (default: the scheme's own, 42 for BBH as the paper draws, 0 otherwise);
``size``   the cap of the test split (250, BBH's size).

reasoning-gym spells the last two ``split_seed`` and ``test_size``, because its ``seed`` and ``size``
are the generator's (:attr:`Scheme.seed_key`, :attr:`Scheme.size_key`). Each scheme takes options of its
own besides (BIG-bench: ``format``; reasoning-gym: ``size``, ``seed`` and the generator's config).

Splits
    The task's examples are shuffled with the split seed (:meth:`Scheme.order_seed`); ``fewshot`` is the first
    ``shots`` of them, ``test`` the rest without any example whose question repeats a few-shot one, capped at
    ``size``. The same seed gives the same split on any machine, and the two never overlap. A hub trained on a
    task uses ``shots`` as its training set (:func:`train_shots`), so that its ``test`` split stays held out.
    A multiple-choice example (BIG-bench's ``target_scores``) is written as a BBH prompt with its options
    shuffled, seeded by the split seed and the example's index (:func:`format_item`).

As data (``--data``, Ray Data), a split is written once as ``<cache>/<scheme>/splits/<key>/<task>.jsonl``
(:func:`materialize`), keyed by the task's content, the split options and :data:`FORMAT_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import parse_qs

from lorahub_ray.errors import DataError
from lorahub_ray.io import bbh, bigbench, reasoning_gym, storage
from lorahub_ray.io.splits import (  # noqa: F401  (re-exported: the split machinery of every source)
    DEFAULT_SHOTS, FORMAT_VERSION, SPLITS, TEST_SIZE, Item, Scheme, Source, Split, format_item, split_indices,
)

SCHEMES = (bbh.BBH, reasoning_gym.REASONING_GYM, bigbench.BIGBENCH)  # the path-claiming one (BIG-bench) last


def scheme_of(uri) -> Scheme | None:
    """The scheme of a source (``None`` for anything else: a data file, a folder of them)."""
    location = str(uri).split("?", 1)[0]
    return next((s for s in SCHEMES if s.claims(location)), None)


def is_source(uri) -> bool:
    """Whether ``uri`` names a task source (see the module's docstring), not a data file."""
    return uri is not None and scheme_of(uri) is not None


def _query(query: str) -> dict[str, list[str]]:
    """The options of a source's text: ``KEY=VALUE`` pairs joined by ``&``, ``%XX`` escapes decoded, and a
    ``+`` kept as a plus (``operators=["+"]``), not read as a space as in a URL."""
    return parse_qs(query.replace("+", "%2B"), keep_blank_values=True) if query else {}


def parse_source(uri, *, default_split: str = "fewshot") -> Source:
    text = str(uri)
    scheme = scheme_of(text)
    if scheme is None:
        raise DataError(f"{text}: not a task source ({', '.join(s.prefix + 'TASK' for s in SCHEMES)})")
    location, _, query = text.partition("?")
    params = _query(query)
    split_keys = {"split": "split", "shots": "shots", scheme.seed_key: "seed", scheme.size_key: "size"}
    own = ("format",) if "format" in (scheme.options or ()) else ()
    if scheme.options is not None:
        unknown = sorted(set(params) - set(split_keys) - set(scheme.options))
        if unknown:
            raise DataError(f"{text}: unknown option(s) {', '.join(unknown)}; a {scheme.label} source takes "
                            f"{', '.join(list(split_keys) + list(scheme.options))}")

    def one(name, default):
        values = params.get(name)
        return values[-1] if values else default

    split = one("split", default_split)
    if split not in SPLITS:
        raise DataError(f"{text}: split must be one of {', '.join(SPLITS)}, got '{split}'")
    fmt = one("format", "auto") if own else "auto"
    if fmt not in scheme.formats:
        raise DataError(f"{text}: format must be one of {', '.join(scheme.formats)}, got '{fmt}'")
    try:
        seed = int(one(scheme.seed_key, scheme.default_seed))
        shots, size = int(one("shots", DEFAULT_SHOTS)), int(one(scheme.size_key, TEST_SIZE))
    except ValueError:
        raise DataError(f"{text}: {scheme.seed_key}, shots and {scheme.size_key} must be integers") from None
    if shots < 1 or size < 1:
        raise DataError(f"{text}: shots and {scheme.size_key} must be at least 1, got {shots} and {size}")
    rest = tuple((k, v[-1]) for k, v in params.items() if k not in split_keys and k not in own)
    source = Source(location, split, seed, shots, fmt, size, rest, scheme)
    scheme.check(source)
    return source


def with_split(uri, split: str | None = None, seed: int | None = None, **options):
    """``uri`` with ``split``, ``seed`` and ``shots``/``size``/``format`` set if it is a task source (what is
    not given is kept, so an unset split still takes its reader's default); anything else is returned
    unchanged. ``seed`` and ``size`` are the split's, written as the source's scheme spells them."""
    given = {k: v for k, v in {"split": split, "seed": seed, **options}.items() if v is not None}
    if uri is None or not given or not is_source(uri):
        return uri
    scheme = scheme_of(uri)
    spelled = {"seed": scheme.seed_key, "size": scheme.size_key}
    location, _, query = str(uri).partition("?")
    params = {k: v[-1] for k, v in _query(query).items()}
    params.update({spelled.get(k, k): str(v) for k, v in given.items()})
    text = location + "?" + "&".join(f"{k}={v}" for k, v in params.items())
    parse_source(text)  # checks split, seed and any other option now
    return text


def prepare(uris: Iterable[str]) -> None:
    """Fetch what the task sources among ``uris`` need, each scheme once for all of its sources."""
    by_scheme: dict[int, tuple[Scheme, list[Source]]] = {}
    for uri in uris:
        if is_source(uri):
            source = parse_source(uri)
            by_scheme.setdefault(id(source.scheme), (source.scheme, []))[1].append(source)
    for scheme, sources in by_scheme.values():
        scheme.prepare(sources)


def task_name(uri) -> str:
    """The display name of a source's task."""
    source = parse_source(uri)
    return source.scheme.name(source)


def load_split(uri, *, default_split: str = "fewshot") -> Split:
    """The examples of one split of a task source (see the module's docstring)."""
    source = parse_source(uri, default_split=default_split)
    scheme = source.scheme
    items = scheme.items(source)
    chosen = split_indices(items, source.split, scheme.order_seed(source.seed), source.shots, str(uri), source.size)
    pairs = [format_item(items[i], random.Random(scheme.option_seed(source.seed, i))) for i in chosen]
    return Split(scheme.name(source), [x for x, _ in pairs], [y for _, y in pairs])


def materialize(uri, *, default_split: str = "test") -> Path:
    """The split written once as ``<cache>/<scheme>/splits/<key>/<task>.jsonl`` (``input``/``output``),
    so that every reader of data files (Ray Data included) reads it as any other test set. The key
    hashes the task's content (:meth:`Scheme.fingerprint`), the split options and the format version."""
    source = parse_source(uri, default_split=default_split)
    scheme = source.scheme
    digest = hashlib.sha256(f"{FORMAT_VERSION} {source.split} {source.seed} {source.shots} {source.format} "
                            f"{source.size}".encode())
    digest.update(scheme.fingerprint(source))
    path = storage.cache_root() / scheme.folder / "splits" / digest.hexdigest()[:16] / f"{scheme.name(source)}.jsonl"
    if not path.is_file():
        split = load_split(source.uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text("".join(json.dumps({"input": i, "output": o}) + "\n"
                               for i, o in zip(split.inputs, split.outputs)), encoding="utf-8")
        os.replace(tmp, path)
    return path


def count(uri) -> int:
    """How many examples the task source ``uri`` holds (all splits)."""
    source = parse_source(uri)
    return len(source.scheme.items(source))


def train_shots(uri, *, train_size: int, test_size: int) -> int:
    """The ``shots`` that make the ``fewshot`` split a training set of up to ``train_size`` examples
    while at least ``min(test_size, a fifth of the task)`` stay for the held-out ``test`` split."""
    n = count(uri)
    held_out = max(1, min(test_size, n // 5))
    shots = min(train_size, n - held_out)
    if shots < 1:
        raise DataError(f"{uri}: {n} examples, too few to train on and hold some out")
    return shots
