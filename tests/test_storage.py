"""Loading from s3:// against a real S3 API on loopback (moto server), data files and their errors."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lorahub_ray as lr
from helpers import EXAMPLES, write_jsonl
from lorahub_ray.io import storage
from s3 import moto_server, s3fs_client, upload_dir


@pytest.fixture(scope="module")
def s3(world):
    with moto_server() as endpoint:
        upload_dir(world["base"], "s3://models/tiny-t5")
        upload_dir(world["hub"], "s3://hub/modules")
        upload_dir(world["examples"].parent, "s3://data/fewshot")  # includes fewshot.jsonl
        yield endpoint


def test_s3_fs_sees_moto_not_aws(s3):
    assert s3.startswith("http://127.0.0.1:")
    assert s3fs_client().exists("s3://models/tiny-t5/config.json")


def test_learning_from_s3_equals_learning_from_local_paths(world, s3):
    kwargs = dict(budget=4, progress=False)
    remote = lr.lorahub_learning("s3://models/tiny-t5", ["s3://hub/modules"], "s3://data/fewshot/fewshot.jsonl", **kwargs)
    local = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), **kwargs)
    assert [m["name"] for m in remote.recipe.modules] == [m["name"] for m in local.recipe.modules]
    assert [m["sha256"] for m in remote.recipe.modules] == [m["sha256"] for m in local.recipe.modules]
    assert remote.recipe.base_model_sha256 == local.recipe.base_model_sha256
    assert remote.search.weights == local.search.weights
    assert remote.recipe.modules[0]["uri"] == "s3://hub/modules/alpha"


def test_remote_copies_are_cached_and_refreshed_when_changed(world, s3, tmp_path):
    first = storage.resolve("s3://hub/modules/alpha")
    stamp = (first / ".lorahub-ray-source.json").stat().st_mtime_ns
    assert storage.resolve("s3://hub/modules/alpha") == first
    assert (first / ".lorahub-ray-source.json").stat().st_mtime_ns == stamp  # not downloaded again
    upload_dir(world["modules"][1], "s3://hub/changed")
    before = storage.sha256_dir(storage.resolve("s3://hub/changed"))
    s3fs_client().pipe("s3://hub/changed/README.md", b"edited")
    assert storage.sha256_dir(storage.resolve("s3://hub/changed")) != before


def test_missing_s3_prefix_is_a_clear_error(s3):
    with pytest.raises(lr.LoraHubError, match="no LoRA module .* under 's3://hub/nothing-here'"):
        lr.load_modules(["s3://hub/nothing-here"])
    with pytest.raises(lr.LoraHubError, match="base model 's3://models/missing' does not exist or is empty"):
        storage.resolve("s3://models/missing", what="base model")


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(lr.LoraHubError, match="base model 'nobody/no-such-model' is not a local directory and could not be fetched"):
        storage.resolve("nobody/no-such-model", what="base model")


# --- data files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "csv"])
def test_read_examples_in_every_format(tmp_path, fmt):
    path = tmp_path / f"data.{fmt}"
    rows = EXAMPLES + [{"input": "copy: 007", "output": "007"}]
    if fmt == "jsonl":
        write_jsonl(path, rows)
    elif fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["input", "output"])
            writer.writeheader()
            writer.writerows(rows)
    examples = lr.read_examples(str(path))
    assert examples.inputs == [r["input"] for r in rows] and examples.outputs[-1] == "007"


def test_read_examples_from_s3(s3):
    assert len(lr.read_examples("s3://data/fewshot/fewshot.jsonl")) == 5


def test_renamed_fields(tmp_path):
    path = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "answer": "b"}])
    examples = lr.read_examples(str(path), input_field="question", output_field="answer")
    assert (examples.inputs, examples.outputs) == (["a"], ["b"])


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"input": "a", "output": "b"}\n{"input": "c"}\n', r"bad.jsonl, line 2: missing field 'output'"),
        ('{"input": "a", "output": "b"}\n\n{"input": 3, "output": "x"}\n', r"bad.jsonl, line 3: field 'input' must be a string, got int"),
        ('{"input": "a", "output": "b"}\n{oops\n', r"bad.jsonl, line 2: invalid JSON"),
        ("", r"bad.jsonl: no examples \(empty file\)"),
        ('["a", "b"]\n', r"bad.jsonl, line 1: expected a JSON object"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(lr.DataError, match=message):
        lr.read_examples(str(path))


def test_malformed_data_fails_before_any_model_is_loaded(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("input,label\nx,y\n")
    with pytest.raises(lr.DataError, match=r"bad.csv, line 2: missing field 'output'"):
        lr.lorahub_learning("/no/such/model", ["/no/such/modules"], str(bad), progress=False)


def test_unknown_format(tmp_path):
    with pytest.raises(lr.DataError, match="unknown data format"):
        lr.read_examples(str(tmp_path / "data.txt"))
