"""BIG-bench task files as an example source: parsing, BBH options, splits, errors, the sdist extraction."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from lorahub_ray.errors import DataError
from lorahub_ray.evaluation.evaluate import list_data_files, read_tasks
from lorahub_ray.io import bigbench, bigbench_sdist, sources
from lorahub_ray.io.examples import read_examples

DATA = Path(__file__).parent / "data" / "bigbench"
# the real sdist, when this machine has it (no network in the tests): $LORAHUB_RAY_BIGBENCH, else the user's cache
REAL_SDIST = Path(os.environ.get("LORAHUB_RAY_BIGBENCH") or Path(os.environ.get(
    "LORAHUB_RAY_CACHE", Path.home() / ".cache" / "lorahub-ray")) / "bigbench").expanduser() / bigbench_sdist.SDIST
OPTION = re.compile(r"^\(([A-Z])\) (.*)$")


def options_of(prompt: str) -> tuple[str, list[str]]:
    question, _, rest = prompt.partition("\nOptions:\n")
    lines = rest.split("\n")
    assert all(OPTION.match(line) for line in lines), prompt
    assert [OPTION.match(line).group(1) for line in lines] == [chr(65 + i) for i in range(len(lines))]
    return question, [OPTION.match(line).group(2) for line in lines]


def test_generative_task_gives_input_output_pairs_with_its_prefix():
    task = json.loads((DATA / "tiny_reverse" / "task.json").read_text())
    pairs = {e["input"]: (e["target"] if isinstance(e["target"], str) else e["target"][0]) for e in task["examples"]}
    for split in ("fewshot", "test"):
        ex = read_examples(f"{DATA / 'tiny_reverse'}?split={split}")
        for x, y in zip(ex.inputs, ex.outputs):
            assert x.startswith("Reverse the word.\nWord: ")
            word = x.rsplit("Word: ", 1)[1]
            assert y == pairs[word] == word[::-1]  # a list of targets keeps its first


def test_multiple_choice_becomes_bbh_prompt_with_shuffled_options_and_letter_answer():
    task = json.loads((DATA / "tiny_first_letter" / "task.json").read_text())
    by_question = {e["input"]: e["target_scores"] for e in task["examples"]}
    answers = []
    for split in ("fewshot", "test"):
        ex = read_examples(DATA / "tiny_first_letter" / "task.json", ) if split == "fewshot" else \
            read_examples(f"{DATA / 'tiny_first_letter' / 'task.json'}?split=test")
        for x, y in zip(ex.inputs, ex.outputs):
            question, options = options_of(x)
            scores = by_question[question]
            assert sorted(options) == sorted(scores)
            assert re.fullmatch(r"\([A-Z]\)", y)
            assert scores[options[ord(y[1]) - 65]] == 1  # the answer letter points at the correct option
            answers.append(y)
    # the file always lists the correct option first; shuffled, the answers are not all (A)
    assert len(set(answers)) >= 3 and answers.count("(A)") < len(answers) / 2


def test_split_reproducible_disjoint_and_seeded():
    src = DATA / "tiny_reverse"
    few = read_examples(f"{src}?split=fewshot&seed=3")
    test = read_examples(f"{src}?split=test&seed=3")
    assert len(few) == 5 and len(test) == 14 - 5
    assert not set(few.inputs) & set(test.inputs)
    assert read_examples(f"{src}?split=fewshot&seed=3").inputs == few.inputs  # same seed, same draw
    assert read_examples(f"{src}?split=fewshot&seed=4").inputs != few.inputs
    assert read_examples(f"{src}?seed=3").inputs == few.inputs  # read as examples: the few-shot split
    assert read_examples(f"{src}?seed=3&shots=2").inputs == few.inputs[:2]
    # as data (evaluate --data): the test split, materialised once as JSON Lines named after the task
    files = list_data_files(f"{src}?seed=3")
    assert Path(files[0]).name == "tiny_reverse.jsonl"
    assert read_examples(files[0]).inputs == test.inputs
    assert list_data_files(f"{src}?seed=3") == files


def test_split_excludes_repeated_questions_and_caps_test_at_250(tmp_path):
    examples = [{"input": f"q{i % 300}", "target": "a"} for i in range(600)]  # every question twice
    folder = tmp_path / "repeats"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps({"name": "repeats", "examples": examples}))
    few = read_examples(folder)
    test = read_examples(f"{folder}?split=test")
    assert len(test) == bigbench.TEST_SIZE
    assert not set(few.inputs) & set(test.inputs)


def test_format_picks_the_target_or_the_options_and_size_caps_the_test_set(tmp_path):
    examples = [{"input": f"What is {i} plus 1?", "target": str(i + 1),
                 "target_scores": {str(i + 1): 1, "banana": 0}} for i in range(40)]
    folder = tmp_path / "both"
    folder.mkdir()
    (folder / "task.json").write_text(json.dumps({"examples": examples}))
    auto = read_examples(f"{folder}?split=test")  # options by default, as BBH's tasks with both
    assert all(y in ("(A)", "(B)") and "\nOptions:\n" in x for x, y in zip(auto.inputs, auto.outputs))
    gen = read_examples(f"{folder}?split=test&format=generate&size=7")
    assert len(gen) == 7 and all(int(y) == int(x.split()[2]) + 1 for x, y in zip(gen.inputs, gen.outputs))
    assert gen.inputs == [x.partition("\nOptions:\n")[0] for x in auto.inputs[:7]]  # the same split either way
    (folder / "task.json").write_text(json.dumps({"examples": examples + [{"input": "x", "target_scores": {"a": 1, "b": 0}}]}))
    with pytest.raises(DataError, match="example 40: no 'target', so it cannot be generative"):
        read_examples(f"{folder}?format=generate")
    with pytest.raises(DataError, match="format must be one of auto, generate, choice"):
        read_examples(f"{folder}?format=text")


def test_task_with_subtasks_is_their_union_and_a_subtask_alone(tmp_path):
    whole = sources.load_split(f"{DATA / 'tiny_family'}?split=test")
    assert whole.name == "tiny_family"
    assert {f.parent.name for f in bigbench.task_files(str(DATA / "tiny_family"))[1]} == {"double", "parity"}
    assert len(whole.inputs) == 16 - 5
    sub = sources.load_split(f"{DATA / 'tiny_family' / 'parity'}?split=test")
    assert sub.name == "tiny_family_parity"  # as BBH names subtasks
    for x, y in zip(sub.inputs, sub.outputs):
        question, options = options_of(x)
        n = int(question.split()[1])
        assert options[ord(y[1]) - 65] == ("odd" if n % 2 else "even")
    files = list_data_files(DATA / "tiny_family" / "double" / "task.json")
    assert Path(files[0]).name == "tiny_family_double.jsonl"
    (_, examples), = read_tasks(str(DATA / "tiny_family" / "double"))
    assert all(x.startswith("Double the number: ") and int(y) == 2 * int(x.split(": ")[1])
               for x, y in zip(examples.inputs, examples.outputs))


def test_with_split_sets_options_only_on_bigbench_sources(tmp_path):
    plain = tmp_path / "test.jsonl"
    assert sources.with_split(str(plain), "test", 2) == str(plain)
    uri = sources.with_split("bigbench:date_understanding", None, 7)
    assert sources.parse_source(uri, default_split="test") == bigbench.Source("bigbench:date_understanding", "test", 7)
    assert sources.parse_source(sources.with_split(uri, "fewshot")).split == "fewshot"
    with pytest.raises(DataError, match="split must be one of fewshot, test"):
        sources.with_split("bigbench:x", "train")
    with pytest.raises(DataError, match="unknown option.*color"):
        read_examples("bigbench:x?color=red")


@pytest.mark.parametrize("example, message", [
    ({"target": "x"}, "example 1: 'input' must be a non-empty string"),
    ({"input": "q"}, "example 1: neither 'target' nor 'target_scores'"),
    ({"input": "q", "target": 3}, "example 1: 'target' must be a string"),
    ({"input": "q", "target_scores": {"a": 1}}, "example 1: 'target_scores' must map at least two options"),
    ({"input": "q", "target_scores": {"a": 1, "b": "high"}}, "example 1: the score of option 'b' must be a number"),
    ("q", "example 1: expected an object, got str"),
])
def test_malformed_entries_name_the_file_and_example(tmp_path, example, message):
    path = tmp_path / "bad" / "task.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"name": "bad", "examples": [{"input": "ok", "target": "ok"}, example] +
                                [{"input": f"q{i}", "target": "a"} for i in range(6)]}))
    with pytest.raises(DataError, match=re.escape(str(path)) + ", " + re.escape(message)):
        read_examples(path)
    with pytest.raises(DataError, match=re.escape(str(path))):
        list_data_files(path.parent)  # as data, before any model loads


def test_malformed_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "task.json").write_text("{not json")
    with pytest.raises(DataError, match=r"a/task.json: not valid JSON"):
        read_examples(tmp_path / "a")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "task.json").write_text(json.dumps({"name": "b", "examples": [{"input": "q", "target": "a"}]}))
    with pytest.raises(DataError, match="1 examples, too few for 5 few-shot examples"):
        read_examples(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "task.json").write_text(json.dumps({"name": "c"}))
    with pytest.raises(DataError, match="no examples, and no subtask folders"):
        read_examples(tmp_path / "c")


# --- the sdist --------------------------------------------------------------------------------------


def _fake_members(prefix: str) -> dict[str, bytes]:
    """The files of a small BIG-bench tree under ``prefix``: two JSON tasks (one with subtasks) and a programmatic one."""
    members = {f"{prefix}/{t}/{inner}": (DATA / t / inner).read_bytes()
               for t, inner in [("tiny_reverse", "task.json"), ("tiny_family", "task.json"),
                                ("tiny_family", "double/task.json"), ("tiny_family", "parity/task.json")]}
    members[f"{prefix}/made_up_program/task.py"] = b"# a programmatic task\n"
    members[f"{prefix}/tiny_reverse/README.md"] = b"not extracted\n"
    return members


def _assert_the_naming_errors(where: str) -> None:
    """A task named wrong (close matches), a programmatic task, a missing subtask and no task at all: one clear error each."""
    with pytest.raises(DataError, match=f"no BIG-bench task 'tiny_revers' in {re.escape(where)} .*did you mean tiny_reverse"):
        read_examples("bigbench:tiny_revers")
    with pytest.raises(DataError, match="'made_up_program' is programmatic"):
        read_examples("bigbench:made_up_program")
    with pytest.raises(DataError, match="has no subtask 'triple'; its subtasks: double, parity"):
        read_examples("bigbench:tiny_family/triple")
    with pytest.raises(DataError, match="name a task"):
        read_examples("bigbench:")


def _fake_sdist(folder: Path) -> Path:
    """A small archive laid out as the sdist (:func:`_fake_members`)."""
    members = _fake_members(f"bigbench-{bigbench_sdist.VERSION}/bigbench/benchmark_tasks")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / bigbench_sdist.SDIST
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_sdist_tasks_extracted_by_name_once(tmp_path, monkeypatch):
    sdist = _fake_sdist(tmp_path / "sdist")
    monkeypatch.setenv("LORAHUB_RAY_BIGBENCH", str(sdist.parent))
    monkeypatch.setenv("LORAHUB_RAY_CACHE", str(tmp_path / "cache"))
    ex = read_examples("bigbench:tiny_family/parity?split=test&seed=1")
    assert len(ex) == 3
    extracted = sorted(p.relative_to(bigbench_sdist.tasks_dir()).as_posix()
                       for p in bigbench_sdist.tasks_dir().rglob("*") if p.is_file())
    assert extracted == ["index.json", "tiny_family/.complete", "tiny_family/double/task.json",
                         "tiny_family/parity/task.json", "tiny_family/task.json"]  # only the task asked for
    assert bigbench_sdist.read_index() == {"made_up_program": False, "tiny_family": True, "tiny_reverse": True}
    assert read_examples("bigbench:tiny_family/parity?split=test&seed=1").inputs == ex.inputs
    sdist.unlink()  # extracted tasks are read without the archive; unknown ones fail from the index
    assert len(read_examples("bigbench:tiny_family")) == 5
    _assert_the_naming_errors(where="bigbench==1.0.0")


@pytest.mark.parametrize("layout", ["bigbench/benchmark_tasks", "benchmark_tasks"], ids=["checkout", "tasks-folder"])
def test_a_bigbench_tree_is_read_in_place(tmp_path, monkeypatch, layout):
    """$LORAHUB_RAY_BIGBENCH naming a BIG-bench checkout: its tasks are read where they are, nothing fetched or
    extracted, with the sdist's errors (unknown task with close matches, programmatic task, missing subtask)."""
    for name, data in _fake_members(str(tmp_path / "BIG-bench" / layout)).items():
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_bytes(data)
    monkeypatch.setenv("LORAHUB_RAY_BIGBENCH", str(tmp_path / "BIG-bench"))
    monkeypatch.setenv("LORAHUB_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # a fetch would fail
    ex = read_examples("bigbench:tiny_family/parity?split=test&seed=1")
    assert ex.inputs == read_examples(str(tmp_path / "BIG-bench" / layout / "tiny_family" / "parity")
                                      + "?split=test&seed=1").inputs
    assert len(read_examples("bigbench:tiny_family")) == 5
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("task.json"))
    assert bigbench_sdist.read_index() == {"made_up_program": False, "tiny_family": True, "tiny_reverse": True}
    _assert_the_naming_errors(where=str(tmp_path / "BIG-bench" / layout))


def test_missing_sdist_without_network_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAHUB_RAY_BIGBENCH", str(tmp_path / "empty"))
    monkeypatch.setenv("LORAHUB_RAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there: no network
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    with pytest.raises(DataError, match="could not download bigbench==1.0.0 with pip.*BIG-bench checkout"):
        read_examples("bigbench:date_understanding")


@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory):
    if bigbench_sdist.tree_dir() is not None:  # a BIG-bench checkout named by $LORAHUB_RAY_BIGBENCH: read in place
        dirs = bigbench_sdist.extract_tasks(["date_understanding", "logical_deduction", "object_counting"])
        return {**dirs, "index": bigbench_sdist.read_index()}
    if not REAL_SDIST.is_file():
        pytest.skip(f"the BIG-bench sdist is not at {REAL_SDIST} (set LORAHUB_RAY_BIGBENCH to its folder or to a "
                    f"BIG-bench checkout; PyPI no longer serves bigbench=={bigbench_sdist.VERSION})")
    cache = tmp_path_factory.mktemp("real-bigbench")
    old = {k: os.environ.get(k) for k in ("LORAHUB_RAY_BIGBENCH", "LORAHUB_RAY_CACHE")}
    os.environ.update(LORAHUB_RAY_BIGBENCH=str(REAL_SDIST.parent), LORAHUB_RAY_CACHE=str(cache))
    try:
        dirs = bigbench_sdist.extract_tasks(["date_understanding", "logical_deduction", "object_counting"])
        dirs["index"] = bigbench_sdist.read_index()  # every task of the sdist: whether it has JSON data
        return dirs
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("task", ["date_understanding", "logical_deduction/three_objects"])
def test_real_multiple_choice_tasks(real_tasks, task):
    """Files extracted from the real sdist: the correct option, first in the file, is spread over the letters."""
    folder = real_tasks[task.split("/")[0]] / (task.split("/")[1] if "/" in task else "")
    raw = json.loads((folder / "task.json").read_text())
    firsts = sum(max(e["target_scores"], key=e["target_scores"].get) == next(iter(e["target_scores"]))
                 for e in raw["examples"])
    test = read_examples(f"{folder}?split=test&seed=0")
    assert len(test) == min(bigbench.TEST_SIZE, len(raw["examples"]) - 5)
    letters = [y for y in test.outputs]
    for x in test.inputs[:20]:
        options_of(x)
    if firsts > 0.9 * len(raw["examples"]):  # date_understanding: 99% first in the file
        assert letters.count("(A)") < 0.4 * len(letters)


def test_real_generative_task(real_tasks):
    raw = json.loads((real_tasks["object_counting"] / "task.json").read_text())
    targets = {e["input"]: e["target"][0] for e in raw["examples"]}
    ex = read_examples(f"{real_tasks['object_counting']}?split=test&seed=0")
    assert all(targets[x] == y for x, y in zip(ex.inputs, ex.outputs))


def test_real_sdist_holds_the_bbh_sources(real_tasks):
    from lorahub_ray.evaluation.bbh import BBH_PROGRAMMATIC, BBH_SOURCES, resolve_task

    index = real_tasks["index"]
    assert len(BBH_SOURCES) + len(BBH_PROGRAMMATIC) == 27
    assert all(index.get(source.split("/")[0]) is True for source in BBH_SOURCES.values())
    assert [index.get(t) for t in ("boolean_expressions", "multistep_arithmetic", "web_of_lies")] == [False] * 3
    subs = sorted(p.parent.name for p in real_tasks["logical_deduction"].glob("*/task.json"))
    assert subs == ["five_objects", "seven_objects", "three_objects"]
    assert resolve_task("logical_deduction_three_objects") == ("logical_deduction_three_objects",
                                                               "bigbench:logical_deduction/three_objects")
