"""The embedded default hub, built with a tiny recipe (seconds): layout, files, cache, determinism."""

import json
import threading
import time

import pytest
from safetensors.torch import load_file

from lorahub_ray.demo import world as default_hub
from lorahub_ray.demo.world import BuildConfig, build_default_hub

TINY = BuildConfig(d_model=32, layers=1, batch_size=8, base_steps=10, lora_steps=3, test=100)


@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    return build_default_hub(tmp_path_factory.mktemp("hub-a"), progress=False, config=TINY)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_base_and_modules_load(hub):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    assert hub.base_model.parent == hub.root and hub.root.name.startswith("default-hub-")
    tokenizer = AutoTokenizer.from_pretrained(hub.base_model)
    assert len(tokenizer) == 384
    assert list(hub.modules) == list(default_hub.UPSTREAM_TASKS) and len(hub.modules) >= 8
    for name, path in hub.modules.items():
        assert (path / "adapter_model.safetensors").is_file()
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == default_hub.BASE_MODEL_ID
        assert config["peft_type"] == "LORA" and config["r"] == TINY.lora_r
        model = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(hub.base_model), path)
        assert any("lora_A" in k for k, _ in model.named_parameters()), name


def test_modules_share_one_lora_a(hub):
    """Only B is trained, from one seeded A: LoraHub's sums of A's and B's compose linearly."""
    tensors = [load_file(path / "adapter_model.safetensors") for path in hub.modules.values()]
    a_keys = [k for k in tensors[0] if "lora_A" in k]
    assert a_keys and all(t[k].equal(tensors[0][k]) for t in tensors for k in a_keys)
    assert not all(t[k].equal(tensors[0][k]) for t in tensors for k in tensors[0] if "lora_B" in k)


def test_unseen_tasks_have_five_shots_and_a_disjoint_test_set(hub):
    assert len(hub.unseen_tasks) >= 2
    for name, task in hub.unseen_tasks.items():
        assert task.name == name and task.description
        fewshot, test = read_jsonl(task.fewshot), read_jsonl(task.test)
        assert len(fewshot) == 5 and len(test) >= 100
        for row in fewshot + test:
            assert set(row) == {"input", "output"} and all(isinstance(v, str) and v for v in row.values())
        assert not {r["input"] for r in fewshot} & {r["input"] for r in test}
        assert len({r["input"] for r in test}) == len(test)


def test_second_call_is_a_cache_hit(hub, monkeypatch):
    monkeypatch.setattr(default_hub, "_build", lambda *a: pytest.fail("rebuilt a finished hub"))
    again = build_default_hub(hub.root.parent, progress=False, config=TINY)
    assert again == hub
    monkeypatch.setenv("LORAHUB_RAY_CACHE", str(hub.root.parent))  # the default cache location
    assert build_default_hub(progress=False, config=TINY) == hub


def test_build_is_deterministic_and_keyed_by_the_recipe(hub, tmp_path):
    other = build_default_hub(tmp_path, progress=False, config=TINY)
    assert other.root.name == hub.root.name
    for name in hub.modules:
        a = load_file(hub.modules[name] / "adapter_model.safetensors")
        b = load_file(other.modules[name] / "adapter_model.safetensors")
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), name
    for name, task in hub.unseen_tasks.items():
        assert task.fewshot.read_bytes() == other.unseen_tasks[name].fewshot.read_bytes()
        assert task.test.read_bytes() == other.unseen_tasks[name].test.read_bytes()
    assert BuildConfig(seed=1).digest() != BuildConfig().digest() != TINY.digest()


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crash(root, config, progress):
        (root / "half").write_text("written before the crash")
        raise RuntimeError("boom")

    monkeypatch.setattr(default_hub, "_build", crash)
    with pytest.raises(RuntimeError, match="boom"):
        build_default_hub(tmp_path, progress=False, config=TINY)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_concurrent_callers_build_once(tmp_path, monkeypatch):
    calls = []
    real_build = default_hub._build

    def counted(root, config, progress):
        calls.append(root)
        time.sleep(0.2)  # let the other caller reach the lock
        real_build(root, config, progress)

    monkeypatch.setattr(default_hub, "_build", counted)
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_default_hub(tmp_path, progress=False, config=TINY)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(results) == 2 and results[0] == results[1]
