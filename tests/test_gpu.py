"""On a GPU (skipped without one): every path a run takes there gives what it gives on the CPU. As in every run,
the modules load on the CPU and the model sits on the GPU: compose, the objective on each layer path, shared passes,
the answer-set losses, a whole search (with its written adapter and merged model), generation, option likelihoods,
training a module and serving a recipe composed.

No GPU in CI; on a lent one (docs/testing.md): ``python3 -m pytest -q tests/test_gpu.py``. The search needs
nevergrad, and nevergrad's NGOpt needs numpy < 2.4 (pyproject.toml)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import lorahub_ray as lr
from helpers import EXAMPLES, make_llama_base, make_llama_module, write_jsonl
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.model import build_model, load_base_model
from lorahub_ray.core.objective import FewShotObjective

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

INPUTS = [e["input"] for e in EXAMPLES]
OUTPUTS = [e["output"] for e in EXAMPLES]
RTOL = 1e-4  # float32 on two devices: products sum in another order


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu-llama")
    base = make_llama_base(root / "base")
    return {"base": base, "modules": [make_llama_module(base, root / "hub" / f"m{i}", seed=i + 1) for i in range(3)],
            "examples": write_jsonl(root / "fewshot.jsonl", EXAMPLES)}


def _world(world, llama, family):
    if family == "seq2seq":
        return world["base"], [str(world["hub"])]
    return llama["base"], [str(p) for p in llama["modules"]]


def _objective(base, modules, device, **options):
    model, tok, _ = load_base_model(str(base), device=device)
    composer = LoraComposer(model, lr.load_modules(modules))
    return FewShotObjective(composer, tok, INPUTS, OUTPUTS, **options), tok


def _weights(n, count=3):
    rng = np.random.default_rng(3)
    return [list(rng.uniform(-1.5, 1.5, n)) for _ in range(count)]


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
@pytest.mark.parametrize("loss", ["reference", "mean"])
def test_the_objective_on_the_gpu_equals_the_cpu_on_every_path(world, llama, family, loss):
    base, modules = _world(world, llama, family)
    on = {device: _objective(base, modules, device, loss=loss)[0] for device in ("cpu", "cuda")}
    assert on["cuda"].composer.stacked.is_cuda and on["cuda"].batches[0]["input_ids"].is_cuda
    for weights in _weights(on["cpu"].composer.num_modules):
        expected = on["cpu"](weights)
        for path in ("never", "always", "auto"):
            on["cuda"].composer.merge_into_weights = path
            assert on["cuda"](weights) == pytest.approx(expected, rel=RTOL), path
        assert on["cuda"].evaluate_many([weights, [0.0] * len(weights)])[0] == pytest.approx(expected, rel=RTOL)


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_answer_set_losses_on_the_gpu_equal_the_cpu(world, llama, family):
    from lorahub_ray.core.answer_loss import answer_losses

    base, modules = _world(world, llama, family)
    sets = [(o, o + "x", "zz") for o in OUTPUTS[:3]] + [None] * (len(OUTPUTS) - 3)
    values = {}
    for device in ("cpu", "cuda"):
        objective, tok = _objective(base, modules, device)
        values[device] = answer_losses(objective.composer, tok, INPUTS, OUTPUTS, sets,
                                       _weights(objective.composer.num_modules))
    for cpu, gpu in zip(values["cpu"], values["cuda"]):
        assert gpu == pytest.approx(cpu, rel=RTOL)


def test_a_search_on_the_gpu_writes_a_recipe_adapter_and_merged_model_that_the_cpu_agrees_with(world, tmp_path):
    pytest.importorskip("nevergrad")
    from lorahub_ray.evaluation.generate import generate

    out = tmp_path / "run"
    result = lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]), output=out,
                                 budget=8, progress=False, merge=True, device="cuda")
    assert next(result.model.parameters()).is_cuda
    recipe = json.loads((out / "recipe.json").read_text())
    on_cpu, _ = _objective(world["base"], [m["uri"] for m in recipe["modules"]], "cpu")
    assert on_cpu(recipe["weights"]) == pytest.approx(recipe["objective"], rel=RTOL)
    adapter_only = tmp_path / "adapter-only"  # the run without model/: its adapter/ goes onto the base at load
    shutil.copytree(out, adapter_only, ignore=shutil.ignore_patterns("model"))
    predictions = [generate(*loaded, INPUTS, max_new_tokens=6) for loaded in (
        lr.load_model(out / "model", device="cuda"),  # the merged model, written from the GPU
        lr.load_model(adapter_only, device="cuda"),  # the adapter, merged into the base on the GPU
        build_model(out / "recipe.json", device="cpu"))]  # the recipe's modules composed again, on the CPU
    assert predictions[0] == predictions[1] == predictions[2]


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_generation_on_the_gpu_equals_the_cpu(world, llama, family):
    from lorahub_ray.evaluation.generate import generate

    base = world["base"] if family == "seq2seq" else llama["base"]
    outputs = {}
    for device in ("cpu", "cuda"):
        model, tok, _ = load_base_model(str(base), device=device)
        outputs[device] = generate(model, tok, INPUTS, batch_size=2, max_new_tokens=6)
    assert outputs["cuda"] == outputs["cpu"]


@pytest.mark.parametrize("family", ["seq2seq", "causal"])
def test_option_likelihoods_on_the_gpu_equal_the_cpu(world, llama, family):
    from lorahub_ray.evaluation.options import option_log_likelihoods

    base = world["base"] if family == "seq2seq" else llama["base"]
    prompts = [f"{x}\nOptions:\n(A) {y}\n(B) {y}s\n(C) no" for x, y in zip(INPUTS, OUTPUTS)]
    scores = {}
    for device in ("cpu", "cuda"):
        model, tok, _ = load_base_model(str(base), device=device)
        scores[device] = option_log_likelihoods(model, tok, prompts, batch_size=4)
    for cpu, gpu in zip(scores["cpu"], scores["cuda"]):
        assert gpu == pytest.approx(cpu, rel=RTOL)


def test_training_a_module_on_the_gpu(llama, tmp_path):
    from lorahub_ray.core.train import train_module

    result = train_module(str(llama["base"]), str(llama["examples"]), tmp_path / "module", steps=3, batch_size=2,
                          device="cuda", progress=False)
    assert len(result.losses) == 3 and all(np.isfinite(result.losses))
    module = lr.load_module(str(tmp_path / "module"))
    assert all(not t.is_cuda for t in module.state_dict.values())  # written from the GPU, loaded on the CPU


def test_serving_composed_recipes_on_the_gpu_equals_the_cpu(world, tmp_path):
    pytest.importorskip("nevergrad")
    from lorahub_ray.serving.host import ModelHost

    specs = []
    for seed in (1, 2):
        lr.lorahub_learning(str(world["base"]), [str(world["hub"])], str(world["examples"]),
                            output=tmp_path / f"r{seed}", budget=4, seed=seed, progress=False)
        specs.append(f"r{seed}={tmp_path / f'r{seed}'}")
    hosts = {device: ModelHost(specs, mode="composed", device=device) for device in ("cpu", "cuda")}
    for spec in specs:
        rid = spec.split("=")[0]
        assert hosts["cuda"].generate(rid, INPUTS, max_new_tokens=6) == hosts["cpu"].generate(rid, INPUTS,
                                                                                             max_new_tokens=6)
