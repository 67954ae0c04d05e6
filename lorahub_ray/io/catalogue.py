"""The module hub: a catalogue of LoRA modules in one Parquet file, local or on S3.

One row per module: ``id, uri, base_model, task, rank, target_modules, sha256, size, created``.
``sha256`` is :func:`lorahub_ray.io.storage.sha256_dir` of the module's files when it was added;
modules drawn from the hub are loaded with it as ``expected_sha256``, so a module changed or
corrupted since is refused with its id named (:class:`~lorahub_ray.errors.IntegrityError`).

>>> add("s3://hub/catalogue.parquet", ["s3://hub/modules/"], task="qa")
>>> modules = load_selected("s3://hub/catalogue.parquet", ["task~^qa", "rank=16"])
"""

from __future__ import annotations

import io
import os
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import fsspec

from lorahub_ray.io import storage
from lorahub_ray.errors import IntegrityError, LoraHubError
from lorahub_ray.core.modules import LoraModule, check_compatible, load_module, module_name

COLUMNS = ("id", "uri", "base_model", "task", "rank", "target_modules", "sha256", "size", "created")
_STAMP = ".lorahub-ray-source.json"


class CatalogueError(LoraHubError):
    """A missing or malformed hub catalogue, or a bad filter on it."""


def schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()), ("uri", pa.string()), ("base_model", pa.string()), ("task", pa.string()),
        ("rank", pa.int32()), ("target_modules", pa.list_(pa.string())), ("sha256", pa.string()),
        ("size", pa.int64()), ("created", pa.timestamp("s", tz="UTC")),
    ])


# --- reading and writing -------------------------------------------------------------------------


def read_catalogue(uri: str | Path, *, missing_ok: bool = False) -> list[dict]:
    """The rows of the catalogue at ``uri`` (a local path or ``s3://...``), in file order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    uri = str(uri)
    try:
        with fsspec.open(uri, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise CatalogueError(f"no hub catalogue at '{uri}'") from None
    try:
        table = pq.read_table(io.BytesIO(raw))
    except (pa.ArrowInvalid, OSError) as exc:
        raise CatalogueError(f"hub catalogue '{uri}' is not a Parquet file ({exc})") from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise CatalogueError(f"hub catalogue '{uri}' lacks column(s) {', '.join(missing)}")
    rows = table.select(list(COLUMNS)).to_pylist()
    ids = [r["id"] for r in rows]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise CatalogueError(f"hub catalogue '{uri}' repeats id(s) {', '.join(repeated)}")
    return rows


def write_catalogue(uri: str | Path, rows: Sequence[dict]) -> None:
    """Write the whole catalogue at once: a local rename, or one PUT to S3 (no half-written file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in rows], schema=schema())
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    data = buffer.getvalue()
    uri = str(uri)
    if storage.is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        fs.pipe_file(path, data)
        fs.invalidate_cache(path)
        return
    path = Path(uri.removeprefix("file://")).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --- adding --------------------------------------------------------------------------------------


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name != _STAMP)


def _absolute(uri: str) -> str:
    if storage.is_remote(uri) or not Path(uri.removeprefix("file://")).expanduser().exists():
        return uri  # s3://..., or a Hub id
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def entry_for(module: LoraModule, *, task: str | None = None, id: str | None = None) -> dict:
    """A catalogue row describing a loaded module."""
    targets = module.config.get("target_modules") or []
    if isinstance(targets, str):  # PEFT also allows a regex here
        targets = [targets]
    return {
        "id": id or module.name, "uri": module.uri, "base_model": str(module.config.get("base_model_name_or_path") or ""),
        "task": task if task is not None else (id or module.name), "rank": int(module.config["r"]),
        "target_modules": sorted(targets), "sha256": module.sha256, "size": _dir_size(module.path),
        "created": datetime.now(timezone.utc).replace(microsecond=0),
    }


def add(catalogue: str | Path, uris: Sequence[str], *, task: str | None = None, replace: bool = False) -> list[dict]:
    """Add the modules at ``uris`` (adapter directories or folders of them, local or ``s3://``) to the
    catalogue, creating it if needed. Ids are the modules' directory names; an id already in the
    catalogue is refused unless ``replace``. ``task`` defaults to the id. Returns the new rows."""
    rows = read_catalogue(catalogue, missing_ok=True)
    expanded = [u for uri in uris for u in storage.list_adapter_uris(_absolute(str(uri)))]
    if not expanded:
        raise CatalogueError("no module to add")
    names = [module_name(u) for u in expanded]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CatalogueError(f"several modules would get the id(s) {', '.join(repeated)}; add them separately")
    existing = {r["id"] for r in rows}
    clash = sorted(existing & set(names))
    if clash and not replace:
        raise CatalogueError(f"hub catalogue '{catalogue}' already holds module(s) {', '.join(clash)}; "
                             "use --replace to update them")
    new = [entry_for(load_module(u), task=task) for u in expanded]  # reads, checks and hashes each module
    by_id = {r["id"]: r for r in rows}
    for row in new:
        by_id[row["id"]] = row
    write_catalogue(catalogue, list(by_id.values()))
    return new


# --- selecting -----------------------------------------------------------------------------------

_FILTER = re.compile(r"^\s*([A-Za-z_]+)\s*(!=|!~|=|~)(.*)$")


@dataclass(frozen=True)
class Filter:
    """``FIELD=VALUE`` (equal; for target_modules: holds VALUE), ``FIELD!=VALUE``, ``FIELD~REGEX``
    (a regular expression found in the value, or in any target module), ``FIELD!~REGEX``."""

    field: str
    op: str
    value: str

    @classmethod
    def parse(cls, text: str) -> "Filter":
        match = _FILTER.match(text)
        if not match:
            raise CatalogueError(f"bad filter '{text}': write FIELD=VALUE, FIELD!=VALUE, FIELD~REGEX or FIELD!~REGEX")
        field, op, value = match.group(1), match.group(2), match.group(3).strip()
        if field not in COLUMNS:
            raise CatalogueError(f"bad filter '{text}': unknown field '{field}'; fields: {', '.join(COLUMNS)}")
        if "~" in op:
            try:
                re.compile(value)
            except re.error as exc:
                raise CatalogueError(f"bad filter '{text}': invalid regular expression ({exc})") from None
        return cls(field, op, value)

    def __call__(self, row: dict) -> bool:
        value = row[self.field]
        values = [str(v) for v in value] if isinstance(value, list) else [_text(value)]
        if "~" in self.op:
            hit = any(re.search(self.value, v) for v in values)
        else:
            hit = self.value in values
        return hit if not self.op.startswith("!") else not hit


def _text(value) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def select(rows: Sequence[dict], filters: Sequence[str | Filter] = ()) -> list[dict]:
    parsed = [f if isinstance(f, Filter) else Filter.parse(f) for f in filters]
    return [r for r in rows if all(f(r) for f in parsed)]


def load_selected(catalogue: str | Path, filters: Sequence[str] = (), *, progress=None) -> list[LoraModule]:
    """Load the catalogue's modules that pass every filter, checking each one's sha256, and check
    that they fit together. Raises before loading anything if a filter is bad or nothing matches."""
    parsed = [Filter.parse(f) for f in filters]
    rows = select(read_catalogue(catalogue), parsed)
    if not rows:
        shown = " ".join(filters) if filters else "(no filter)"
        raise CatalogueError(f"no module in hub catalogue '{catalogue}' matches {shown}")
    modules = []
    for row in rows:
        modules.append(load_module(row["uri"], row["id"], expected_sha256=row["sha256"]))
        if progress is not None:
            progress(modules[-1])
    check_compatible(modules)
    return modules


# --- validating ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    id: str
    message: str


def _base_shapes(base_model: str):
    """The base model's family and the shape of each of its parameters."""
    from lorahub_ray.core.families import family_of_model
    from lorahub_ray.core.model import load_base_model

    model, _, _ = load_base_model(base_model, device="cpu")
    return family_of_model(model), {name: tuple(p.shape) for name, p in model.named_parameters()}


def _fits_base(module: LoraModule, shapes: dict[str, tuple]) -> str | None:
    """Why ``module``'s tensors do not fit the base model's layers, or None."""
    for key, tensor in module.state_dict.items():
        match = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.[^.]+)?\.weight$", key)
        if not match:
            return f"tensor '{key}' is not a LoRA A or B weight"
        layer, which = match.groups()
        base = shapes.get(f"{layer}.weight")
        if base is None:
            return f"tensor '{key}' matches no layer of the base model"
        if len(base) != 2:
            return f"tensor '{key}' targets a layer of shape {base}, not a linear layer"
        out_features, in_features = base
        want = (module.config["r"], in_features) if which == "A" else (out_features, module.config["r"])
        if tuple(tensor.shape) != want:
            return f"tensor '{key}' has shape {tuple(tensor.shape)} but the base model needs {want}"
    return None


def validate(catalogue: str | Path, *, base_model: str | None = None, filters: Sequence[str] = ()) -> tuple[list[dict], list[Problem]]:
    """Check every (selected) module of the catalogue: its files load, its sha256 and its rank,
    target modules and base model agree with the catalogue, and (with ``base_model``) its tensors fit
    that model's family (a ``SEQ_2_SEQ_LM`` adapter for a T5, ``CAUSAL_LM`` for a Llama) and layers.
    Returns ``(rows checked, problems)``; every module is checked."""
    rows = select(read_catalogue(catalogue), filters)
    family, shapes = _base_shapes(base_model) if base_model is not None else (None, None)
    problems = []
    for row in rows:
        try:
            module = load_module(row["uri"], row["id"], expected_sha256=row["sha256"])
        except IntegrityError as exc:
            problems.append(Problem(row["id"], str(exc)))
            continue
        except LoraHubError as exc:
            problems.append(Problem(row["id"], f"cannot be loaded: {exc}"))
            continue
        entry = entry_for(module)
        for key in ("rank", "target_modules", "base_model"):
            if entry[key] != row[key]:
                problems.append(Problem(row["id"], f"module '{row['id']}' has {key}={entry[key]!r} but the catalogue "
                                                   f"records {row[key]!r}"))
        if family is not None:
            try:
                family.check_module(module)
            except LoraHubError as exc:
                problems.append(Problem(row["id"], str(exc)))
                continue
        if shapes is not None:
            why = _fits_base(module, shapes)
            if why:
                problems.append(Problem(row["id"], f"module '{row['id']}' does not fit base model '{base_model}': {why}"))
    return rows, problems
