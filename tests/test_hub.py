"""The module hub (Parquet catalogue on S3) and outputs written to S3, against moto's S3 server on loopback."""

import json
import re
from datetime import datetime, timedelta, timezone

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

import lorahub_ray as lr
from helpers import assert_same_weights, make_base, make_module
from lorahub_ray.io import catalogue as hub
from lorahub_ray.io import storage
from lorahub_ray.cli import app
from s3 import moto_server, s3fs_client, upload_dir

CAT = "s3://hub/hub-catalogue.parquet"


@pytest.fixture(scope="module")
def s3(world):
    import s3fs

    with moto_server() as endpoint:
        s3fs.S3FileSystem.clear_instance_cache()  # no cached client pointing at another test's server
        upload_dir(world["base"], "s3://models/tiny-t5")
        upload_dir(world["hub"], "s3://hub/modules")
        upload_dir(world["examples"].parent, "s3://data/fewshot")
        if not s3fs_client().exists("runs"):  # moto's state outlives its server within a process
            s3fs_client().mkdir("runs")
        yield endpoint
    s3fs.S3FileSystem.clear_instance_cache()


def run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def catalogue(s3):
    """The four world modules in an S3 catalogue: alpha, beta with task qa; gamma, delta with task nli."""
    code, out = run("hub", "add", CAT, "s3://hub/modules/alpha", "s3://hub/modules/beta", "--task", "qa")
    assert code == 0, out
    code, out = run("hub", "add", CAT, "s3://hub/modules/gamma", "s3://hub/modules/delta", "--task", "nli")
    assert code == 0, out
    return CAT


# --- the catalogue --------------------------------------------------------------------------------


def test_catalogue_is_parquet_with_the_documented_columns(catalogue, world):
    with s3fs_client().open(catalogue, "rb") as fh:
        table = pq.read_table(fh)
    assert table.column_names == list(hub.COLUMNS)
    rows = {r["id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["alpha", "beta", "delta", "gamma"]
    alpha = rows["alpha"]
    assert alpha["uri"] == "s3://hub/modules/alpha" and alpha["task"] == "qa"
    assert alpha["base_model"] == "tests/tiny-t5" and alpha["rank"] == 4 and alpha["target_modules"] == ["q", "v"]
    assert alpha["sha256"] == storage.sha256_dir(world["modules"][0])  # same bytes as the local module
    assert alpha["size"] == sum(p.stat().st_size for p in world["modules"][0].rglob("*") if p.is_file())
    assert abs(datetime.now(timezone.utc) - alpha["created"]) < timedelta(hours=1)  # when it was added, in UTC


def test_hub_list_filters(catalogue):
    code, out = run("hub", "list", catalogue, "--json", "--filter", "task~^q")
    assert code == 0, out
    assert [json.loads(line)["id"] for line in out.splitlines() if line.startswith("{")] == ["alpha", "beta"]
    code, out = run("hub", "list", catalogue, "--json", "--filter", "task=nli", "--filter", "id!=delta")
    assert [json.loads(line)["id"] for line in out.splitlines() if line.startswith("{")] == ["gamma"]
    rows = hub.read_catalogue(catalogue)
    assert [r["id"] for r in hub.select(rows, ["target_modules=q", "rank=4"])] == ["alpha", "beta", "gamma", "delta"]
    assert hub.select(rows, ["target_modules=k"]) == []


@pytest.mark.parametrize("bad, message", [
    ("colour=red", "unknown field 'colour'"),
    ("task~(", "invalid regular expression"),
    ("task", "write FIELD=VALUE"),
])
def test_bad_filter_is_a_clear_error(catalogue, bad, message):
    code, out = run("hub", "list", catalogue, "--filter", bad)
    assert code == 2 and message in out and "Traceback" not in out


def test_adding_an_id_twice_needs_replace(catalogue, world):
    code, out = run("hub", "add", catalogue, "s3://hub/modules/alpha")
    assert code == 2 and "already holds module(s) alpha" in out and "--replace" in out
    code, out = run("hub", "add", catalogue, "s3://hub/modules/alpha", "--task", "qa", "--replace")
    assert code == 0, out
    assert sorted(r["id"] for r in hub.read_catalogue(catalogue)) == ["alpha", "beta", "delta", "gamma"]


def test_missing_or_malformed_catalogue_is_named(s3):
    code, out = run("hub", "list", "s3://hub/nope.parquet")
    assert code == 2 and "no hub catalogue at 's3://hub/nope.parquet'" in out
    s3fs_client().pipe("s3://hub/bad.parquet", b"not parquet")
    code, out = run("hub", "list", "s3://hub/bad.parquet")
    assert code == 2 and "'s3://hub/bad.parquet' is not a Parquet file" in out


def test_local_catalogue_records_absolute_paths(world, tmp_path, monkeypatch):
    monkeypatch.chdir(world["root"])
    cat = tmp_path / "cat.parquet"
    rows = hub.add(cat, ["hub"], task="t")  # a folder of modules, relative
    assert [r["id"] for r in rows] == ["alpha", "beta", "delta", "gamma"]
    assert all(r["uri"].startswith("/") for r in hub.read_catalogue(cat))


# --- validation and integrity ---------------------------------------------------------------------


def test_validate_passes_a_sound_catalogue(catalogue, s3):
    code, out = run("hub", "validate", catalogue, "--base-model", "s3://models/tiny-t5")
    assert code == 0, out
    assert "4 of 4 module(s) valid" in out


def test_corrupted_module_is_refused_with_its_id(world, s3, tmp_path):
    cat = "s3://hub/corrupt-catalogue.parquet"
    upload_dir(world["modules"][1], "s3://hub/corrupt/beta2")
    upload_dir(world["modules"][2], "s3://hub/corrupt/gamma2")
    hub.add(cat, ["s3://hub/corrupt/"])
    fs = s3fs_client()
    weights = fs.cat("s3://hub/corrupt/beta2/adapter_model.safetensors")
    fs.pipe("s3://hub/corrupt/beta2/adapter_model.safetensors", weights[:-8] + b"\0" * 8)  # same size, other bytes

    code, out = run("hub", "validate", cat)
    assert code == 1
    assert re.search(r"beta2:.*module 'beta2' at 's3://hub/corrupt/beta2' has changed", out.replace("\n", " "))
    assert "1 of 2 module(s) valid" in out

    with pytest.raises(lr.IntegrityError, match="module 'beta2'"):
        hub.load_selected(cat)
    code, out = run("search", "--model", "s3://models/tiny-t5", "--hub", cat, "--examples",
                    "s3://data/fewshot/fewshot.jsonl", "--output", tmp_path / "out", "--budget", "2")
    assert code == 2 and "module 'beta2'" in out and "has changed" in out
    assert not (tmp_path / "out").exists()
    assert len(hub.load_selected(cat, ["id=gamma2"])) == 1  # the sound one still loads


def test_validate_flags_a_module_for_another_base_model(world, tmp_path):
    other = make_base(tmp_path / "wide", d_model=48)
    cat = tmp_path / "cat.parquet"
    hub.add(cat, [str(world["modules"][0]), str(make_module(other, tmp_path / "wide-mod", seed=3))])
    rows, problems = hub.validate(cat, base_model=str(world["base"]))
    assert len(rows) == 2
    assert [p.id for p in problems] == ["wide-mod"]
    assert "does not fit base model" in problems[0].message and "shape" in problems[0].message


def test_validate_flags_a_module_of_the_other_family_by_its_config(world, tmp_path):
    from helpers import make_llama_base, make_llama_module

    llama = make_llama_base(tmp_path / "llama")
    cat = tmp_path / "cat.parquet"
    hub.add(cat, [str(world["modules"][0]), str(make_llama_module(llama, tmp_path / "causal-mod", seed=1))])
    rows, problems = hub.validate(cat, base_model=str(world["base"]))
    assert [p.id for p in problems] == ["causal-mod"]
    message = problems[0].message
    assert "CAUSAL_LM adapter" in message and "seq2seq" in message and "adapter_config.json" in message
    _, problems = hub.validate(cat, base_model=str(llama))  # and the T5 module against the Llama
    assert [p.id for p in problems] == [world["modules"][0].name]
    assert "SEQ_2_SEQ_LM adapter" in problems[0].message


def test_validate_flags_a_catalogue_row_that_disagrees(world, tmp_path):
    cat = tmp_path / "cat.parquet"
    hub.add(cat, [str(world["modules"][0])])
    rows = hub.read_catalogue(cat)
    rows[0]["rank"] = 8
    hub.write_catalogue(cat, rows)
    _, problems = hub.validate(cat)
    assert [p.message for p in problems] == ["module 'alpha' has rank=4 but the catalogue records 8"]


# --- search from the hub, outputs on S3 -----------------------------------------------------------


def test_search_from_hub_writes_recipe_to_s3_then_evaluate(catalogue, s3, world):
    out = "s3://runs/from-hub"
    code, text = run("search", "--model", "s3://models/tiny-t5", "--hub", catalogue, "--filter", "task~^(qa|nli)$",
                     "--filter", "id!=delta", "--examples", "s3://data/fewshot/fewshot.jsonl", "--output", out,
                     "--budget", "3")
    assert code == 0, text
    recipe = lr.Recipe.load(out)
    assert [m["name"] for m in recipe.modules] == ["alpha", "beta", "gamma"]
    rows = {r["id"]: r for r in hub.read_catalogue(catalogue)}
    assert [m["sha256"] for m in recipe.modules] == [rows[n]["sha256"] for n in ("alpha", "beta", "gamma")]
    files = {p.split("runs/from-hub/", 1)[1] for p in s3fs_client().find(out)}
    assert {"recipe.json", "history.parquet", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= files
    assert not any(f.startswith("model/") or ".tmp" in f for f in files)  # no merged model without --merge

    code, text = run("evaluate", "--model", out, "--data", "s3://data/fewshot/fewshot.jsonl", "--output", f"{out}/eval")
    assert code == 0, text
    assert re.search(r"accuracy \d+\.\d\d% on 5 examples", text)
    metrics = json.loads(s3fs_client().cat(f"{out}/eval/metrics.json"))
    assert metrics["examples"] == 5
    # the recipe rebuilds the same merged model from the modules on S3, hashes checked
    model, _ = lr.build_model(out, device="cpu")
    assert_same_weights(model, lr.load_model(out, device="cpu")[0])  # the base with the uploaded adapter merged in


def test_search_filter_matching_nothing_fails_before_loading(catalogue, tmp_path):
    code, out = run("search", "--model", "s3://models/nowhere", "--hub", catalogue, "--filter", "task=summarize",
                    "--examples", "s3://data/fewshot/fewshot.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "no module in hub catalogue" in out and "task=summarize" in out
    code, out = run("search", "--model", "m", "--filter", "task=qa", "--examples", "e.jsonl", "--output", tmp_path / "o")
    assert code == 2 and "--filter selects modules of a hub catalogue" in out


# --- the storage hook -----------------------------------------------------------------------------


def _files(uri):
    fs = s3fs_client()
    return {p.split(uri.removeprefix("s3://") + "/", 1)[1]: fs.cat(p) for p in fs.find(uri)}


def test_s3_output_replaces_an_earlier_output_and_drops_stale_files(s3, tmp_path):
    uri = "s3://runs/hook"
    with storage.output_directory(uri, marker="recipe.json") as tmp:
        (tmp / "old.txt").write_text("old")
        (tmp / "recipe.json").write_text("{}")
    assert set(_files(uri)) == {"old.txt", "recipe.json"}
    with storage.output_directory(uri, marker="recipe.json") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "new.txt").write_text("new")
        (tmp / "recipe.json").write_text('{"v": 2}')
    assert _files(uri) == {"sub/new.txt": b"new", "recipe.json": b'{"v": 2}'}


def test_s3_output_failure_leaves_the_earlier_output_untouched(s3):
    uri = "s3://runs/keep"
    with storage.output_directory(uri, marker="recipe.json") as tmp:
        (tmp / "recipe.json").write_text("first")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.output_directory(uri, marker="recipe.json") as tmp:
            (tmp / "recipe.json").write_text("second")
            raise RuntimeError("boom")
    assert _files(uri) == {"recipe.json": b"first"}


def test_missing_bucket_is_refused_before_work(s3, world):
    with pytest.raises(lr.LoraHubError, match="bucket 'no-such-bucket' does not exist"):
        lr.lorahub_learning("s3://models/does-not-matter", [str(world["hub"])], str(world["examples"]),
                            output="s3://no-such-bucket/run", progress=False)


def test_s3_prefix_holding_other_files_is_refused_before_work(s3, world):
    s3fs_client().pipe("s3://runs/precious/notes.txt", b"mine")
    with pytest.raises(lr.LoraHubError, match="'s3://runs/precious' is not empty and holds no recipe.json"):
        lr.lorahub_learning("s3://models/does-not-matter", [str(world["hub"])], str(world["examples"]),
                            output="s3://runs/precious", progress=False)
    assert _files("s3://runs/precious") == {"notes.txt": b"mine"}
