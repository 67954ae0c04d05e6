"""Serving: the model host (merged and composed paths), the Serve application over HTTP on loopback,
request validation, and the CLI's early errors."""

import json
import shutil

import httpx
import pytest
from ports import free_port

import lorahub_ray as lr
from lorahub_ray.evaluation.generate import generate
from lorahub_ray.core.learning import write_output
from lorahub_ray.serving.host import ModelHost, RecipeSpec, ServeConfigError, parse_specs

INPUTS = ["reverse: abc", "reverse: hello world", "upper: ray", "xy"]
OTHER_WEIGHTS = [1.2, -0.9, 0.6, -0.4]


@pytest.fixture(scope="module")
def recipes(world, tmp_path_factory):
    """Three recipe directories over the tiny base: 'a' (searched: recipe.json and adapter/), 'b' (other
    weights, written with its merged model/ too) and 'c' (b's recipe.json only, neither adapter/ nor
    model/: served by rebuilding from the recipe). The expected generations come from the models in
    memory (the search's merged model, the rebuilt one), not from the directories."""
    root = tmp_path_factory.mktemp("recipes")
    result = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), output=root / "a",
                                 budget=6, progress=False)
    recipe_b = lr.Recipe(**{**json.loads(result.recipe.to_json()), "weights": OTHER_WEIGHTS})
    model_b, tok = lr.build_model(recipe_b)
    write_output(root / "b", recipe_b, result.modules, merged=(model_b, tok))
    (root / "c").mkdir()
    shutil.copy(root / "b" / "recipe.json", root / "c" / "recipe.json")
    expected = {"a": generate(result.model, result.tokenizer, INPUTS, max_new_tokens=8),
                "b": generate(model_b, tok, INPUTS, max_new_tokens=8)}
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


def test_merged_host_merges_the_adapter_at_load_or_takes_the_merged_model(recipes):
    root = recipes["root"]
    assert not (root / "a" / "model").exists() and (root / "b" / "model").is_dir()
    host = ModelHost([f"a={root / 'a'}", f"b={root / 'b'}"], mode="merged", device="cpu")
    assert host.generate("a", INPUTS, max_new_tokens=8) == recipes["expected"]["a"]
    assert host.generate("b", INPUTS, max_new_tokens=8) == recipes["expected"]["b"]


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




@pytest.fixture(scope="module")
def served(ray_cluster, recipes):
    """Serve on 127.0.0.1 with two applications: 'multi' (recipes a and b, composed, one replica)
    and 'single' (recipe c, merged, rebuilt from its recipe)."""
    from ray import serve
    from ray.serve.api import RunTarget

    from lorahub_ray.cluster.serve_app import app

    root = recipes["root"]
    port = free_port()
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
    ({"inputs": ["x"], "recipe": "../a"}, 404, "unknown recipe (not an id: 1-64 letters"),  # never echoes a path
    ({"inputs": ["x"], "recipe": "/etc/passwd"}, 404, "unknown recipe (not an id: 1-64 letters"),
])
def test_bad_requests_get_4xx_with_a_message(served, body, status, message):
    if isinstance(body, str):
        r = served.post("/multi/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = served.post("/multi/generate", json=body)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert message in detail
    assert "Traceback" not in r.text and "passwd" not in r.text


def test_openai_requests_share_batches_with_generate(served, recipes):
    """Concurrent /generate and /v1/completions requests (greedy, or sampling with other options) go through
    one replica's batches: fewer model calls than requests, and each greedy answer is /generate's text."""
    from concurrent.futures import ThreadPoolExecutor

    import openai
    from ray import serve

    from lorahub_ray.cluster.serve_app import MODEL

    client = openai.OpenAI(base_url=f"{served.base_url}/multi/v1", api_key="unused", max_retries=0, timeout=120)
    model = serve.get_deployment_handle(MODEL, app_name="multi")
    before = model.health.remote().result()

    def call(i):
        text, recipe = INPUTS[i % len(INPUTS)], "ab"[i % 2]
        if i % 3 == 0:
            r = served.post("/multi/generate", json={"inputs": [text], "max_new_tokens": 8, "recipe": recipe})
            return recipe, text, r.json()["outputs"][0]
        if i % 3 == 1:
            done = client.completions.create(model=recipe, prompt=text, max_tokens=8, temperature=0)
            return recipe, text, done.choices[0].text
        client.completions.create(model=recipe, prompt=text, max_tokens=8, temperature=1.3, top_p=0.9, n=2)
        return None, None, None

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(48)))
    after = model.health.remote().result()
    for recipe, text, output in answers:
        if recipe is not None:
            assert output == recipes["expected"][recipe][INPUTS.index(text)]
    calls, inputs = after["generate_calls"] - before["generate_calls"], after["inputs"] - before["inputs"]
    assert inputs == 64 and calls < 48, (calls, inputs)  # 16 + 16 + 16 x 2 rows


# --- autoscaling ---------------------------------------------------------------------------------


def test_load_meter_counts_busy_time_and_waiting_inputs():
    from lorahub_ray.serving.load import LoadMeter

    now = [0.0]
    meter = LoadMeter(clock=lambda: now[0])
    assert meter.sample(32) == {"busy": 0.0, "waiting": 0.0, "load": 0.0}
    with meter.accepted(40):
        now[0] = 1.0
        with meter.running(8):  # 8 inputs generating for 1 s of the 2 s window, 32 waiting
            now[0] = 2.0
            assert meter.sample(32) == {"busy": 0.5, "waiting": 32.0, "load": 1.5}
            now[0] = 3.0
        now[0] = 5.0  # busy for 1 s of the next 3 s, then all 40 wait
        assert meter.sample(32) == {"busy": 1 / 3, "waiting": 40.0, "load": 1 / 3 + 40 / 32}
    assert meter.waiting == 0
    with pytest.raises(RuntimeError):  # a failed or cancelled request leaves no waiting inputs behind
        with meter.accepted(5), meter.running(5):
            now[0] = 6.0
            raise RuntimeError("boom")
    assert meter.waiting == 0 and meter.sample(32)["busy"] == 1.0


def test_model_load_policy_asks_for_replicas_in_proportion_to_the_load():
    from types import SimpleNamespace

    from lorahub_ray.cluster.serve_autoscaling import LOAD_METRIC, ModelLoadPolicy

    policy = ModelLoadPolicy(target_model_load=0.8)

    def decide(loads, target=1, lo=1, hi=3):
        ctx = SimpleNamespace(policy_state={}, target_num_replicas=target, capacity_adjusted_min_replicas=lo,
                              capacity_adjusted_max_replicas=hi, aggregated_metrics={LOAD_METRIC: loads} if loads else {})
        return policy(ctx)[0]

    assert decide({"r1": 1.2}) == 2  # busy and a batch waiting: one more replica
    assert decide({"r1": 0.6}) == 1
    assert decide({"r1": 0.9, "r2": 0.7}) == 2
    assert decide({"r1": 0.3, "r2": 0.2}, target=2) == 1  # load gone: back down
    assert decide({"r1": 0.0}, target=2) == 1  # never under min_replicas
    assert decide({"r1": 2.0, "r2": 2.0}, target=2) == 3  # never over max_replicas
    assert decide(None, target=2) == 2  # no reports yet: hold
    with pytest.raises(ValueError):
        ModelLoadPolicy(target_model_load=0)


def test_autoscaling_options_are_checked_and_reach_serve():
    from lorahub_ray.cluster.serve_app import autoscaling_config, parse_args
    from lorahub_ray.cluster.serve_autoscaling import POLICY_PATH

    config = autoscaling_config(parse_args({"recipes": ["r"], "autoscaling_options": {"upscale_delay_s": 1}}))
    assert config["policy"]["policy_function"] == POLICY_PATH and config["upscale_delay_s"] == 1
    assert "policy" not in autoscaling_config(parse_args({"recipes": ["r"], "autoscaling_metric": "ongoing_requests"}))
    with pytest.raises(ServeConfigError, match="unknown field.* upscale_dealy_s"):
        parse_args({"recipes": ["r"], "autoscaling_options": {"upscale_dealy_s": 1}})
    with pytest.raises(ServeConfigError, match="upscale_delay_s: Input should be greater than or equal to 0"):
        parse_args({"recipes": ["r"], "autoscaling_options": {"upscale_delay_s": -1}})
    with pytest.raises(ServeConfigError, match="set max_replicas through their own args"):
        parse_args({"recipes": ["r"], "autoscaling_options": {"max_replicas": 9}})


# A second replica has to start (a fresh process importing torch and loading the model) while
# the machine also runs the load: on the shared 2-core machine that took up to ~90 s
SCALE_UP_WITHIN_S = 300
SCALE_DOWN_WITHIN_S = 120
MAX_LOAD_REQUESTS = 20_000


def _replicas(app_name: str) -> dict:
    from ray import serve

    from lorahub_ray.cluster.serve_app import MODEL

    status = serve.status().applications.get(app_name)
    if status is None or MODEL not in status.deployments:
        return {}
    return dict(status.deployments[MODEL].replica_states)


@pytest.mark.timeout(SCALE_UP_WITHIN_S + SCALE_DOWN_WITHIN_S + 240)
@pytest.mark.parametrize("mode", ["merged", "composed"])
def test_load_brings_a_second_replica_and_its_end_takes_it_away(served, recipes, mode):
    """Serve's status API shows a second model replica RUNNING under a bounded load, then one again
    (the load through POST /generate when merged, through the OpenAI API's /v1/completions when composed)."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from ray import serve

    from lorahub_ray.cluster.serve_app import app

    root = recipes["root"]
    specs = [f"a={root / 'a'}"] + ([f"b={root / 'b'}"] if mode == "composed" else [])
    name = f"scaling-{mode}"
    serve.run(app({"recipes": specs, "mode": mode, "num_cpus": 0.25, "min_replicas": 1, "max_replicas": 2,
                   "max_inputs": 8, "max_batch_size": 32, "batch_wait_timeout_s": 0.005,
                   "autoscaling_options": {"upscale_delay_s": 1, "downscale_delay_s": 3,
                                           "metrics_interval_s": 0.5, "look_back_period_s": 2}}),
              name=name, route_prefix=f"/{name}")
    stop, sent, failures, lock = threading.Event(), [0], [], threading.Lock()

    def client(i):
        with httpx.Client(base_url=served.base_url, timeout=120) as http:
            while not stop.is_set():
                with lock:
                    if sent[0] >= MAX_LOAD_REQUESTS:
                        return
                    sent[0] += 1
                    n = sent[0]
                recipe = "a" if mode == "merged" or n % 2 else "b"
                texts = [f"reverse: {i} {n} {j}" for j in range(8)]
                if mode == "merged":
                    r = http.post(f"/{name}/generate", json={"inputs": texts, "max_new_tokens": 16, "recipe": recipe})
                else:  # the OpenAI route goes through the same batches and load metering
                    r = http.post(f"/{name}/v1/completions", json={"model": recipe, "prompt": texts, "max_tokens": 16,
                                                                  "temperature": 0})
                if r.status_code != 200:
                    failures.append(r.text[:200])

    try:
        assert _replicas(name) == {"RUNNING": 1}
        pool = ThreadPoolExecutor(16)
        loaders = [pool.submit(client, i) for i in range(16)]
        seen, deadline = [], time.monotonic() + SCALE_UP_WITHIN_S
        while time.monotonic() < deadline and not all(f.done() for f in loaders):
            seen.append(_replicas(name))
            if seen[-1].get("RUNNING", 0) >= 2:
                break
            time.sleep(1)
        stop.set()
        for f in loaders:
            f.result()
        pool.shutdown()
        assert seen[-1].get("RUNNING", 0) == 2, f"no second replica within {SCALE_UP_WITHIN_S} s ({sent[0]} " \
                                                f"requests sent); states seen: {seen[-5:]}"
        assert not failures, failures[:3]
        deadline = time.monotonic() + SCALE_DOWN_WITHIN_S
        while time.monotonic() < deadline and _replicas(name) != {"RUNNING": 1}:
            time.sleep(1)
        assert _replicas(name) == {"RUNNING": 1}, f"still {_replicas(name)} {SCALE_DOWN_WITHIN_S} s after the load"
    finally:
        stop.set()
        serve.delete(name)


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
