"""Serving: the model host (merged and composed paths), the Serve application over HTTP on loopback,
request validation, and the CLI's early errors."""

import json
import shutil

import httpx
import pytest

import lorahub_ray as lr
from lorahub_ray.evaluation.generate import generate
from lorahub_ray.core.learning import write_output
from lorahub_ray.serving.host import ModelHost, RecipeSpec, ServeConfigError, parse_specs

INPUTS = ["reverse: abc", "reverse: hello world", "upper: ray", "xy"]
OTHER_WEIGHTS = [1.2, -0.9, 0.6, -0.4]


@pytest.fixture(scope="module")
def recipes(world, tmp_path_factory):
    """Three recipe directories over the tiny base: 'a' (searched), 'b' (other weights) and
    'c' (b's recipe.json only, no model/: served by rebuilding from the recipe)."""
    root = tmp_path_factory.mktemp("recipes")
    result = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), output=root / "a",
                                 budget=6, progress=False)
    recipe_b = lr.Recipe(**{**json.loads(result.recipe.to_json()), "weights": OTHER_WEIGHTS})
    model_b, tok = lr.build_model(recipe_b)
    write_output(root / "b", recipe_b, model_b, tok)
    (root / "c").mkdir()
    shutil.copy(root / "b" / "recipe.json", root / "c" / "recipe.json")
    expected = {}
    for name in ("a", "b"):
        model, tok = lr.load_model(root / name, device="cpu")
        expected[name] = generate(model, tok, INPUTS, max_new_tokens=8)
    assert expected["a"] != expected["b"], "the two recipes must differ for the tests to mean anything"
    return {"root": root, "expected": expected}


# --- configuration -------------------------------------------------------------------------------


def test_recipe_specs_parse_and_reject_bad_ids(tmp_path):
    assert parse_specs(["runs/task", "x=runs/other", {"path": "s3://b/r", "id": "r2"}]) == [
        RecipeSpec("task", "runs/task"), RecipeSpec("x", "runs/other"), RecipeSpec("r2", "s3://b/r")]
    with pytest.raises(ServeConfigError, match="recipe id 'task' is used twice"):
        parse_specs(["runs/task", "other/task"])
    with pytest.raises(ServeConfigError, match=r"recipe id '\.\.' "):
        parse_specs(["..=runs/task"])
    with pytest.raises(ServeConfigError, match="no recipes to serve"):
        parse_specs([])


def test_serve_args_errors_name_the_field():
    from lorahub_ray.cluster.serve_app import parse_args

    with pytest.raises(ServeConfigError, match="recipes: Field required"):
        parse_args({})
    with pytest.raises(ServeConfigError, match="mode: Input should be 'auto', 'merged' or 'composed'"):
        parse_args({"recipes": ["r"], "mode": "fast"})
    with pytest.raises(ServeConfigError, match="default_recipe 'zz' is not one of the recipes"):
        parse_args({"recipes": ["r"], "default_recipe": "zz"})
    with pytest.raises(ServeConfigError, match=r"max_inputs \(64\) must not exceed max_batch_size \(32\)"):
        parse_args({"recipes": ["r"], "max_inputs": 64})
    with pytest.raises(ServeConfigError, match="bad serve args: replicas: Extra inputs are not permitted"):
        parse_args({"recipes": ["r"], "replicas": 3})


def test_config_file_parses_and_builds(tmp_path):
    """deployments/lorahub_serve.yaml is a valid Serve config whose args the builder accepts."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from lorahub_ray.cluster.serve_app import INGRESS, MODEL, parse_args

    text = (Path(__file__).parents[1] / "deployments" / "lorahub_serve.yaml").read_text()
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (application,) = config.applications
    assert application.import_path == "lorahub_ray.cluster.serve_app:app"
    parse_args(application.args)
    assert {d.name for d in application.deployments} == {INGRESS, MODEL}


# --- the model host, in process ------------------------------------------------------------------


def test_composed_host_serves_each_recipe_like_its_merged_model(recipes):
    root = recipes["root"]
    host = ModelHost([f"a={root / 'a'}", f"b={root / 'b'}"], mode="auto", device="cpu")
    assert host.mode == "composed"
    assert host.generate("a", INPUTS, max_new_tokens=8) == recipes["expected"]["a"]
    assert host.generate("b", INPUTS, max_new_tokens=8) == recipes["expected"]["b"]
    assert host.generate("a", INPUTS, max_new_tokens=8) == recipes["expected"]["a"]
    assert host.stats()["switches"] == 3
    assert host.switch("a") == 0.0 and host.switch("b") > 0
    with pytest.raises(KeyError):
        host.generate("../a", INPUTS)


def test_merged_host_falls_back_to_building_from_the_recipe(recipes):
    root = recipes["root"]
    host = ModelHost([f"c={root / 'c'}"], device="cpu")
    assert host.mode == "merged"
    assert host.generate("c", INPUTS, max_new_tokens=8) == recipes["expected"]["b"]


def test_lookup_is_a_dictionary_lookup_without_file_access(monkeypatch):
    import builtins
    import os

    from fastapi import HTTPException

    from lorahub_ray.cluster.serve_app import lookup_recipe

    def no_files(*args, **kwargs):
        raise AssertionError("file access during recipe lookup")

    monkeypatch.setattr(builtins, "open", no_files)
    monkeypatch.setattr(os, "stat", no_files)
    catalog = {"a": {"id": "a"}}
    assert lookup_recipe(catalog, "a") == {"id": "a"}
    for bad in ("../a", "/etc/passwd", "a/../../x"):
        with pytest.raises(HTTPException) as info:
            lookup_recipe(catalog, bad)
        assert info.value.status_code == 404


# --- the Serve application over HTTP -------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_cluster, recipes):
    """Serve on 127.0.0.1 with two applications: 'multi' (recipes a and b, composed, one replica)
    and 'single' (recipe c, merged, rebuilt from its recipe)."""
    from ray import serve
    from ray.serve.api import RunTarget

    from lorahub_ray.cluster.serve_app import app

    root = recipes["root"]
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {"num_cpus": 0.5, "min_replicas": 1, "max_replicas": 1, "max_inputs": 8, "max_input_chars": 64,
              "max_new_tokens_limit": 16, "batch_wait_timeout_s": 0.005}
    try:
        serve.run_many([  # deployed together: replicas start in parallel
            RunTarget(app({"recipes": [f"a={root / 'a'}", {"id": "b", "path": str(root / "b")}], **common}),
                      name="multi", route_prefix="/multi"),
            RunTarget(app({"recipes": [str(root / "c")], **common}), name="single", route_prefix="/single"),
        ])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve.delete("multi")
        serve.delete("single")
        serve.shutdown()


def test_http_generate_equals_in_process_generation(served, recipes):
    r = served.post("/single/generate", json={"inputs": INPUTS, "max_new_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json() == {"recipe": "c", "outputs": recipes["expected"]["b"]}
    r = served.post("/multi/generate", json={"inputs": INPUTS, "max_new_tokens": 8})  # default: the first
    assert r.json() == {"recipe": "a", "outputs": recipes["expected"]["a"]}


def test_two_recipes_from_one_replica_under_concurrency(served, recipes):
    """Concurrent requests for both recipes, batched together and switched in place, each get their own outputs."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [("a" if i % 2 else "b", INPUTS[i % len(INPUTS)]) for i in range(24)]

    def call(job):
        recipe, text = job
        r = served.post("/multi/generate", json={"inputs": [text], "max_new_tokens": 8, "recipe": recipe})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(call, jobs))
    for (recipe, text), answer in zip(jobs, answers):
        assert answer == {"recipe": recipe, "outputs": [recipes["expected"][recipe][INPUTS.index(text)]]}


def test_recipes_health_and_openapi(served, recipes):
    listed = served.get("/multi/recipes").json()
    assert [r["id"] for r in listed] == ["a", "b"]
    assert [r["mode"] for r in listed] == ["composed", "composed"] and [r["default"] for r in listed] == [True, False]
    assert list(listed[1]["weights"].values()) == OTHER_WEIGHTS
    assert [m["name"] for m in listed[0]["modules"]] == ["alpha", "beta", "delta", "gamma"]
    assert served.get("/single/recipes").json()[0]["mode"] == "merged"
    assert served.get("/multi/healthz").json() == {"status": "ok", "recipes": 2}
    spec = served.get("/multi/openapi.json").json()
    assert {"/generate", "/recipes", "/healthz"} <= set(spec["paths"])
    assert "GenerateRequest" in spec["components"]["schemas"]


@pytest.mark.parametrize("body, status, message", [
    ("{not json", 400, "malformed JSON body"),
    ({}, 422, "inputs: Field required"),
    ({"inputs": "abc"}, 422, "inputs: Input should be a valid list"),
    ({"inputs": []}, 422, "inputs: List should have at least 1 item"),
    ({"inputs": [1, 2]}, 422, "inputs.0: Input should be a valid string"),
    ({"inputs": ["x"] * 9}, 422, "too many inputs: 9; at most 8"),
    ({"inputs": ["ok", "y" * 65]}, 422, "input 1 is too long: 65 characters; at most 64"),
    ({"inputs": ["x"], "max_new_tokens": 0}, 422, "max_new_tokens: Input should be greater than or equal to 1"),
    ({"inputs": ["x"], "max_new_tokens": "ten"}, 422, "max_new_tokens: Input should be a valid integer"),
    ({"inputs": ["x"], "max_new_tokens": 17}, 422, "max_new_tokens is 17; at most 16"),
    ({"inputs": ["x"], "input": "typo"}, 422, "input: Extra inputs are not permitted"),
    ({"inputs": ["x"], "recipe": "nope"}, 404, "unknown recipe 'nope'"),
    ({"inputs": ["x"], "recipe": "../a"}, 404, "unknown recipe '../a'"),
    ({"inputs": ["x"], "recipe": "/etc/passwd"}, 404, "unknown recipe '/etc/passwd'"),
])
def test_bad_requests_get_4xx_with_a_message(served, body, status, message):
    if isinstance(body, str):
        r = served.post("/multi/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = served.post("/multi/generate", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert message in detail
    assert "Traceback" not in r.text


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_refuses_bad_recipes_before_starting_anything(recipes, tmp_path):
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    def run(*args):
        result = CliRunner().invoke(app, ["serve", *args])
        assert result.exit_code == 2, result.output
        return " ".join(result.output.split())  # rich wraps long lines

    out = run("--recipe", str(tmp_path / "missing"))
    assert "error: recipe 'missing': '" in out and "is not a directory" in out
    (tmp_path / "empty").mkdir()
    assert "recipe 'empty': no recipe.json in" in run("--recipe", str(tmp_path / "empty"))
    a = str(recipes["root"] / "a")
    assert "recipe id 'a' is used twice" in run("--recipe", a, "--recipe", a)
    assert "unknown serving mode 'fast'" in run("--recipe", a, "--mode", "fast")
    assert "max_inputs (64) must not exceed max_batch_size (32)" in run("--recipe", a, "--max-inputs", "64")
