import os

import pytest

from helpers import EXAMPLES, make_base, make_module, write_jsonl

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny base model, four LoRA modules in one folder, and five few-shot examples."""
    root = tmp_path_factory.mktemp("world")
    base = make_base(root / "base")
    hub = root / "hub"
    modules = [make_module(base, hub / name, seed=i + 1) for i, name in enumerate(["alpha", "beta", "gamma", "delta"])]
    examples = write_jsonl(root / "fewshot.jsonl", EXAMPLES)
    return {"root": root, "base": base, "hub": hub, "modules": modules, "examples": examples}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORAHUB_RAY_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
