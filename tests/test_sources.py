"""Task sources: the BBH release (local, s3://, downloaded over HTTP) and reasoning-gym generators, split
into few-shot examples and a disjoint test set."""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import random
import shutil
import threading
from pathlib import Path

import pytest

from ports import free_port

from lorahub_ray.errors import DataError, LoraHubError
from lorahub_ray.io import bbh, sources
from lorahub_ray.io.examples import read_examples

TINY = Path(__file__).parent / "data" / "bbh"  # hand-written files in the BBH format
REAL = Path(__file__).parents[2] / "shared" / "data" / "bbh"  # the release, beside a worktree or main
real_only = pytest.mark.skipif(not (REAL / "bbh").is_dir(), reason=f"no BBH release at {REAL}")


@pytest.fixture
def tiny_release(monkeypatch):
    monkeypatch.setenv(bbh.ENV, str(TINY))
    return TINY / "bbh"


def release_examples(folder: Path, task: str) -> list[dict]:
    return json.loads((folder / f"{task}.json").read_text())["examples"]


# --- BBH ---------------------------------------------------------------------------------------------


def test_bbh_fewshot_is_the_papers_draw_and_the_test_set_the_rest(tiny_release):
    raw = release_examples(tiny_release, "navigate")
    # the reference (reproduce_bbh.py): random.seed(42); random.shuffle(list(zip(inputs, outputs))); [:5]
    random.seed(42)
    pairs = [(e["input"], e["target"]) for e in raw]
    random.shuffle(pairs)
    fewshot = read_examples("bbh:navigate")
    assert list(zip(fewshot.inputs, fewshot.outputs)) == pairs[:5]
    test = read_examples(str(sources.materialize("bbh:navigate")))
    assert sorted(zip(test.inputs, test.outputs)) == sorted(pairs[5:])  # every other example, as released
    other = read_examples("bbh:navigate?seed=3")
    assert other.inputs != fewshot.inputs and len(other) == 5
    capped = read_examples("bbh:navigate?split=test&size=4")
    assert len(capped) == 4 and not set(capped.inputs) & set(fewshot.inputs)


def test_bbh_release_root_or_its_bbh_folder_and_unknown_tasks(monkeypatch, tiny_release):
    by_root = read_examples("bbh:date_understanding")
    monkeypatch.setenv(bbh.ENV, str(tiny_release))  # the bbh/ folder itself
    assert read_examples("bbh:date_understanding") == by_root
    assert by_root.outputs[0].startswith("(") and "\nOptions:\n(A) " in by_root.inputs[0]  # as released
    with pytest.raises(DataError, match="no BBH task 'navigat' .*did you mean navigate"):
        read_examples("bbh:navigat")
    with pytest.raises(DataError, match=r"web_of_lies.json: no such file .*lacks task 'web_of_lies'"):
        read_examples("bbh:web_of_lies")  # a real BBH task the folder does not hold
    with pytest.raises(DataError, match="unknown option.*format"):
        read_examples("bbh:navigate?format=choice")
    monkeypatch.setenv(bbh.ENV, str(tiny_release / "nowhere"))
    with pytest.raises(DataError, match="LORAHUB_RAY_BBH=.*nowhere: no such folder"):
        read_examples("bbh:navigate")


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "a BBH file is an object whose 'examples' is a non-empty list"),
    ('{"examples": []}', "a BBH file is an object whose 'examples' is a non-empty list"),
    ('{"examples": [{"input": "q", "target": "a"}, {"input": "q2"}]}', "example 1: 'target' must be a non-empty string"),
    ('{"examples": [{"input": "q", "target": "a"}, "x"]}', "example 1: expected an object, got str"),
    ('{"examples": [{"input": 3, "target": "a"}]}', "example 0: 'input' must be a non-empty string"),
    ("{not json", "not valid JSON"),
])
def test_a_malformed_bbh_file_names_the_file_and_the_example(tmp_path, monkeypatch, content, message):
    (tmp_path / "bbh").mkdir()
    (tmp_path / "bbh" / "snarks.json").write_text(content)
    monkeypatch.setenv(bbh.ENV, str(tmp_path))
    with pytest.raises(DataError, match=f"{tmp_path / 'bbh' / 'snarks.json'}.*{message}".replace("(", "\\(")
                       .replace(")", "\\)").replace("[", "\\[")):
        read_examples("bbh:snarks")


def all_tasks_release(root: Path) -> Path:
    """A folder with all 27 BBH files (each a copy of a hand-written one, renamed), under root/bbh/."""
    (root / "bbh").mkdir(parents=True)
    for i, task in enumerate(bbh.TASKS):
        shutil.copy(TINY / "bbh" / ("navigate.json", "sports_understanding.json")[i % 2], root / "bbh" / f"{task}.json")
    return root


@contextlib.contextmanager
def http_server(folder: Path):
    """``python -m http.server`` on a free loopback port, serving ``folder``; yields its URL and the paths asked."""
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", asked
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("layout", ["root", "bbh folder", "default release"])
def test_bbh_downloads_the_27_files_once_over_http(tmp_path, monkeypatch, layout):
    """$LORAHUB_RAY_BBH as an https:// (here http://) prefix, or unset: the public release (the authors'
    repository, whose layout the loopback server copies)."""
    served = all_tasks_release(tmp_path / "served")
    with http_server(served) as (url, asked):
        if layout == "default release":
            assert bbh.RELEASE_URL == "https://raw.githubusercontent.com/suzgunmirac/BIG-Bench-Hard/main"
            monkeypatch.delenv(bbh.ENV, raising=False)
            monkeypatch.setattr(bbh, "RELEASE_URL", url)
        else:
            monkeypatch.setenv(bbh.ENV, f"{url}/bbh" if layout == "bbh folder" else url)
        fewshot = read_examples("bbh:causal_judgement")
        assert sorted(p for p in asked if (served / p.lstrip("/")).is_file()) == sorted(
            f"/bbh/{task}.json" for task in bbh.TASKS)  # each file once
        folder = bbh.task_dir()
        assert folder.is_relative_to(Path(sources.storage.cache_root())) and len(list(folder.glob("*.json"))) == 27
        assert (folder / "web_of_lies.json").read_bytes() == (served / "bbh" / "web_of_lies.json").read_bytes()
    # the server is gone: everything now comes from the cache
    assert read_examples("bbh:causal_judgement") == fewshot
    assert read_examples("bbh:word_sorting?split=test").outputs  # another task, downloaded with the first
    monkeypatch.setenv(bbh.ENV, str(served))
    assert read_examples("bbh:causal_judgement") == fewshot  # the same examples as the local release


def test_bbh_download_errors_name_the_url(tmp_path, monkeypatch):
    partial = tmp_path / "partial"
    (partial / "bbh").mkdir(parents=True)
    shutil.copy(TINY / "bbh" / "navigate.json", partial / "bbh" / "boolean_expressions.json")
    with http_server(partial) as (url, _):
        monkeypatch.setenv(bbh.ENV, url)
        with pytest.raises(DataError, match=f"BBH release at {url} has no {url}/bbh/causal_judgement.json"):
            read_examples("bbh:navigate")
        monkeypatch.setenv(bbh.ENV, f"{url}/elsewhere")
        with pytest.raises(DataError, match="no BBH release at .*elsewhere: neither .*/bbh/boolean_expressions.json"):
            read_examples("bbh:navigate")
        assert not bbh.cache_dir(url).exists() and not list(bbh.cache_dir(url).parent.glob(".download-*"))
    monkeypatch.setenv(bbh.ENV, f"http://127.0.0.1:{free_port()}")  # nobody listens there
    with pytest.raises(DataError, match="could not download the BBH release from http://127.0.0.1.*set \\$LORAHUB_RAY_BBH"):
        read_examples("bbh:navigate")


def test_bbh_from_s3(tmp_path, monkeypatch):
    from s3 import moto_server, upload_dir

    with moto_server():
        upload_dir(all_tasks_release(tmp_path / "release"), "s3://bbh-release/v1")
        monkeypatch.setenv(bbh.ENV, "s3://bbh-release/v1")
        from_s3 = read_examples("bbh:navigate")
    monkeypatch.setenv(bbh.ENV, str(tmp_path / "release"))
    assert read_examples("bbh:navigate") == from_s3


@real_only
def test_the_real_release_27_tasks_6511_examples(monkeypatch):
    monkeypatch.setenv(bbh.ENV, str(REAL))
    total = 0
    for task in bbh.TASKS:
        raw = release_examples(REAL / "bbh", task)
        fewshot = read_examples(f"bbh:{task}")
        test = read_examples(f"bbh:{task}?split=test")
        assert len(fewshot) == 5 and len(test) == len(raw) - 5  # no BBH question repeats
        assert not set(fewshot.inputs) & set(test.inputs)
        released = {(e["input"], e["target"]) for e in raw}
        assert set(zip(fewshot.inputs, fewshot.outputs)) | set(zip(test.inputs, test.outputs)) == released
        total += len(raw)
    assert total == 6511
    assert read_examples("bbh:navigate").outputs == ["Yes", "No", "No", "No", "Yes"]  # seed 42, as the paper draws


# --- reasoning-gym -----------------------------------------------------------------------------------


def test_reasoning_gym_is_seeded_and_passes_the_config_through():
    import reasoning_gym

    first = read_examples("reasoning-gym:products?size=30&seed=4&max_digits=1&split=test")
    assert first == read_examples("reasoning-gym:products?size=30&seed=4&max_digits=1&split=test")
    data = reasoning_gym.create_dataset("products", size=30, seed=4, max_digits=1)
    assert set(zip(first.inputs, first.outputs)) <= {(e["question"], e["answer"]) for e in data}
    assert all(len(n) == 1 for x in first.inputs for n in x.split(": ")[1].split(".")[0].split(" * "))
    assert read_examples("reasoning-gym:products?size=30&seed=5&max_digits=1&split=test") != first
    # split_seed reshuffles the same generated examples; seed draws others
    resplit = read_examples("reasoning-gym:products?size=30&seed=4&max_digits=1&split=test&split_seed=1")
    assert set(resplit.inputs) | set(read_examples("reasoning-gym:products?size=30&seed=4&max_digits=1&split_seed=1")
                                     .inputs) == {e["question"] for e in data}
    # JSON values (lists, booleans) pass through as such
    ops = read_examples('reasoning-gym:simple_equations?size=20&operators=["+"]&operators_weights=[1.0]&split=test')
    assert all("*" not in x and "-" not in x.split(":")[1].replace(" - ", "+") for x in ops.inputs)
    assert sources.task_name("reasoning-gym:products?max_digits=1&size=30&seed=4") == "products-max_digits=1"
    assert sources.task_name("reasoning-gym:products") == "products"


def test_reasoning_gym_split_options_are_spelled_apart_from_the_generators():
    uri = sources.with_split("reasoning-gym:gcd?size=40&seed=2", "test", 7, size=9, shots=3)
    source = sources.parse_source(uri)
    assert (source.split, source.seed, source.size, source.shots) == ("test", 7, 9, 3)
    assert dict(source.params) == {"size": "40", "seed": "2"}  # the generator's, untouched
    assert len(read_examples(uri)) == 9


@pytest.mark.parametrize("uri, message", [
    ("reasoning-gym:prodcts", "no reasoning-gym generator 'prodcts' \\(\\d+ generators\\); did you mean products"),
    ("reasoning-gym:products?max_digit=3", "refused the config of 'products' \\(TypeError: .*max_digit"),
    ("reasoning-gym:products?min_digits=4&max_digits=2", "refused the config of 'products' \\(AssertionError"),
    ("reasoning-gym:products?size=ten", "size and seed must be integers"),
    ("reasoning-gym:graph_color?size=5", "graph_color\\?size=5, example 0: no answer"),
    ("reasoning-gym:", "name a generator"),
])
def test_a_bad_generator_or_config_is_one_line(uri, message):
    with pytest.raises(DataError, match=message) as info:
        read_examples(uri)
    assert "\n" not in str(info.value)


def test_missing_reasoning_gym_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # import reasoning_gym now raises ImportError
    with pytest.raises(LoraHubError, match=r'pip install "lorahub-ray\[hub\]"'):
        read_examples("reasoning-gym:products")


def test_sources_are_data_too(tmp_path, tiny_release):
    from lorahub_ray.evaluation.evaluate import list_data_files

    [path] = list_data_files("reasoning-gym:gcd?size=20&test_size=6")
    assert Path(path).name == "gcd.jsonl" and len(read_examples(path)) == 6
    [path] = list_data_files("bbh:sports_understanding")
    assert Path(path).name == "sports_understanding.jsonl" and len(read_examples(path)) == 12 - 5
    assert not sources.is_source(str(tmp_path / "data.jsonl")) and not sources.is_source("s3://bucket/x.jsonl")
