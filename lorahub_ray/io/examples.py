"""Reading few-shot and test examples from JSON Lines, Parquet or CSV, local or remote.

Every malformed row is reported with its file and row (line number for JSON Lines and CSV,
counting the header line) before any model is loaded.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass

import fsspec

from lorahub_ray.errors import DataError
from lorahub_ray.io import sources

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class Examples:
    inputs: list[str]
    outputs: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.inputs)

    def __post_init__(self):
        if len(self.inputs) != len(self.outputs):
            raise DataError(f"{self.source}: {len(self.inputs)} inputs but {len(self.outputs)} outputs")


def data_format(uri: str) -> str:
    name = str(uri).lower().split("?", 1)[0]
    for suffix, fmt in FORMATS.items():
        if name.endswith(suffix):
            return fmt
    raise DataError(f"{uri}: unknown data format; use one of {', '.join(sorted(FORMATS))}")


def _rows(uri: str, fmt: str) -> list[tuple[int, dict]]:
    """(row label, record) pairs; the label is the line number for JSONL/CSV, the row index for Parquet."""
    try:
        with fsspec.open(str(uri), "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise DataError(f"{uri}: no such file") from None
    if fmt == "jsonl":
        rows = []
        for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{uri}, line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{uri}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            rows.append((lineno, record))
        return rows
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(raw))
        return [(i, rec) for i, rec in enumerate(table.to_pylist())]
    # csv keeps every value as text: "007" stays "007"
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8")))
    return [(reader.line_num, record) for record in reader]


def read_examples(
    uri: str,
    *,
    input_field: str = "input",
    output_field: str = "output",
    require_output: bool = True,
) -> Examples:
    """Read ``(input, output)`` pairs from a JSON Lines, Parquet or CSV file (local or ``s3://``), or a
    task source (``bbh:TASK``, ``reasoning-gym:NAME``, ``bigbench:TASK[/SUBTASK]``, a ``task.json`` or a task
    folder; its ``fewshot`` split unless the source names another; see :mod:`lorahub_ray.io.sources`)."""
    if sources.is_source(uri):
        split = sources.load_split(uri, default_split="fewshot")
        return Examples(split.inputs, split.outputs, str(uri))
    fmt = data_format(uri)
    rows = _rows(uri, fmt)
    if not rows:
        raise DataError(f"{uri}: no examples (empty file)")
    word = "line" if fmt in ("jsonl", "csv") else "row"
    inputs, outputs = [], []
    for label, record in rows:
        for field, required in ((input_field, True), (output_field, require_output)):
            if field not in record or record[field] is None:
                if required:
                    raise DataError(f"{uri}, {word} {label}: missing field '{field}'")
                continue
            if not isinstance(record[field], str):
                raise DataError(
                    f"{uri}, {word} {label}: field '{field}' must be a string, got {type(record[field]).__name__}"
                )
        inputs.append(record[input_field])
        outputs.append(record.get(output_field) or "")
    return Examples(inputs, outputs, str(uri))


def write_jsonl(path, inputs: list[str], outputs: list[str]) -> None:
    with fsspec.open(str(path), "w") as fh:
        for i, o in zip(inputs, outputs):
            fh.write(json.dumps({"input": i, "output": o}) + "\n")


def as_examples(examples, *, input_field: str = "input", output_field: str = "output") -> Examples:
    """A path/URI to JSONL/Parquet/CSV, an :class:`Examples`, or a pair ``(inputs, outputs)``."""
    from pathlib import Path

    if isinstance(examples, Examples):
        return examples
    if isinstance(examples, (str, Path)):
        return read_examples(str(examples), input_field=input_field, output_field=output_field)
    inputs, outputs = (list(part) for part in examples)
    for what, values in (("input", inputs), ("output", outputs)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise DataError(f"<in memory>: {what} {i} is {type(value).__name__}, not a string")
    return Examples(inputs, outputs, "<in memory>")
