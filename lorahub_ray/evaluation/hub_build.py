"""A module hub trained on task sources: one LoRA module per task, each scored on its own held-out split.

This is how a hub for a new base model starts, and the analogue of the paper's modules (trained on
FLAN tasks): :func:`build_hub` trains one module with :func:`lorahub_ray.core.train.train_module` on
each BIG-bench source (``bigbench:TASK[/SUBTASK]``, optionally with ``?format=...``), writes it to
``<output>/modules/<task>/`` and adds it, hashed, to ``<output>/catalogue.parquet``. Each task's
examples are split once with ``split_seed``: up to ``train_size`` to train on (the source's
``fewshot`` split with that many ``shots``, see :func:`lorahub_ray.io.bigbench.train_shots`), and a
disjoint held-out ``test`` split of up to ``test_size``, on which the base model and the merged
module are both scored (exact match, with the same ``template``).

``<output>/build.json`` records the settings, and for each module: its source, example counts,
training seconds, first and last training loss, and both accuracies. It is rewritten after each
module, and a rerun with the same settings skips every module already recorded (resumable); other
settings are an error. The build is seeded (``seed`` for every module's initialisation and batch
order), so a rebuild gives the same modules.

**No BBH data.** A module's training data must not overlap the tasks it will be tested on: a task
that is a source of a BBH task (:data:`lorahub_ray.evaluation.bbh.BBH_SOURCES`) is refused, and
:data:`BIGBENCH_UPSTREAM`, the default list, holds none of the transfer suite's held-out tasks
(:data:`lorahub_ray.evaluation.bbh.TRANSFER_SUITE`) nor a task that contains one of them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from lorahub_ray.errors import LoraHubError
from lorahub_ray.evaluation.bbh import BBH_SOURCES
from lorahub_ray.evaluation.evaluate import evaluate_local
from lorahub_ray.io import bigbench, bigbench_sdist, catalogue, storage
from lorahub_ray.io.examples import read_examples
from lorahub_ray.progress import progress_bar

BUILD_FILE = "build.json"
CATALOGUE_FILE = "catalogue.parquet"
MODULES_DIR = "modules"
# 20 BIG-bench tasks with short examples that a 135M model can learn: none is a BBH source, and none
# is (or contains) a transfer-suite task: arithmetic without 3- and 4-digit addition, linguistic
# mappings without plural_regular and plural_json (its superset), no word_unscrambling
BIGBENCH_UPSTREAM = (
    "bigbench:arithmetic/1_digit_addition?format=generate",
    "bigbench:arithmetic/2_digit_addition?format=generate",
    "bigbench:arithmetic/2_digit_subtraction?format=generate",
    "bigbench:arithmetic/3_digit_subtraction?format=generate",
    "bigbench:arithmetic/4_digit_subtraction?format=generate",
    "bigbench:arithmetic/2_digit_multiplication?format=generate",
    "bigbench:linguistic_mappings/past_tense_regular_json",
    "bigbench:linguistic_mappings/past_tense_irregular_json",
    "bigbench:linguistic_mappings/de_past_tense_json",
    "bigbench:linguistic_mappings/plural_irregular_json",
    "bigbench:linguistic_mappings/question_formation_json",
    "bigbench:linguistic_mappings/sentence_negation_json",
    "bigbench:linguistic_mappings/pronoun_replacement_json",
    "bigbench:strategyqa",
    "bigbench:implicatures",
    "bigbench:odd_one_out",
    "bigbench:entailed_polarity",
    "bigbench:unit_conversion/unit_addition_same",
    "bigbench:periodic_elements/subtask_1",
    "bigbench:tense",
)


def task_name(source: str) -> str:
    """The module's name: the task's display name (``task`` or ``task_subtask``)."""
    return bigbench.task_files(bigbench.parse_source(source).location)[0]


def check_upstream(sources: Sequence[str]) -> None:
    """Refuse a task that is a source of a BBH task (one error naming them all) and duplicate names."""
    bbh = {v.split("/")[0]: k for k, v in BBH_SOURCES.items()}
    bad = []
    for source in sources:
        if not bigbench.is_bigbench(source):
            raise LoraHubError(f"'{source}' is not a BIG-bench source (bigbench:TASK[/SUBTASK], a task.json or a "
                               f"task folder)")
        top = bigbench.sdist_task(source) or Path(bigbench.parse_source(source).location).name
        if top in bbh:
            bad.append(f"{source} (the source of BBH's {bbh[top]})")
    if bad:
        raise LoraHubError("a hub's modules must not be trained on BBH data; refused: " + ", ".join(bad))


def build_hub(model: str, output: str | Path, *, tasks: Sequence[str] = BIGBENCH_UPSTREAM, steps: int = 100,
              rank: int = 8, lr: float = 1e-3, batch_size: int = 8, seed: int = 0, split_seed: int = 0,
              train_size: int = 1000, test_size: int = 100, template: str = "plain", max_new_tokens: int = 32,
              device: str | None = None, progress: bool = True) -> dict:
    """Train one module per task of ``tasks`` for ``model`` under ``output`` and return the manifest
    (``build.json``, see the module's docstring)."""
    from lorahub_ray.core.model import load_base_model  # torch loads with the build, not with the CLI
    from lorahub_ray.core.compose import LoraComposer
    from lorahub_ray.core.modules import load_module
    from lorahub_ray.core.train import train_module

    if not tasks:
        raise LoraHubError("no tasks to train modules on")
    output = Path(output).expanduser()
    settings = {"model": str(model), "steps": steps, "rank": rank, "lr": lr, "batch_size": batch_size, "seed": seed,
                "split_seed": split_seed, "train_size": train_size, "test_size": test_size, "template": template,
                "max_new_tokens": max_new_tokens}
    manifest_path = output / BUILD_FILE
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    if manifest is not None and manifest["settings"] != settings:
        changed = [k for k in settings if manifest["settings"].get(k) != settings[k]]
        raise LoraHubError(f"hub '{output}' was built with other settings ({', '.join(changed)}); use another output")
    if manifest is None:
        storage.check_output(str(output), marker=BUILD_FILE)
        manifest = {"settings": settings, "modules": {}, "seconds": 0.0}
    # every task read, split and checked before any model loads
    check_upstream(tasks)
    bigbench_sdist.extract_tasks(sorted({bigbench.sdist_task(t) for t in tasks if t.startswith(bigbench.SCHEME)}))
    plan = []
    for source in tasks:
        name = task_name(source)
        if any(name == p[0] for p in plan):
            raise LoraHubError(f"task '{name}' is listed twice")
        shots = bigbench.train_shots(source, train_size=train_size, test_size=test_size)
        split = dict(seed=split_seed, shots=shots, size=test_size)
        train = read_examples(bigbench.with_split(source, "fewshot", **split))
        test = bigbench.materialize(bigbench.with_split(source, "test", **split))
        plan.append((name, source, train, test))
    output.mkdir(parents=True, exist_ok=True)
    catalogue_uri = str(output / CATALOGUE_FILE)
    todo = [p for p in plan if p[0] not in manifest["modules"]]
    with progress_bar("hub build (modules)", len(plan), enabled=progress) as advance:
        for _ in range(len(plan) - len(todo)):
            advance()
        for name, source, train, test in todo:
            start = time.perf_counter()
            folder = output / MODULES_DIR / name
            if folder.exists():  # trained by a build that stopped before recording it: train it again
                shutil.rmtree(folder)
            trained = train_module(model, train, folder, rank=rank, steps=steps, lr=lr, batch_size=batch_size,
                                   seed=seed, template=template, device=device, progress=False)
            seconds = time.perf_counter() - start
            base, tokenizer, _ = load_base_model(model, device=device)
            common = dict(tokenizer=tokenizer, max_new_tokens=max_new_tokens, template=template, progress=False)
            before = evaluate_local(base, str(test), **common).metrics
            merged = LoraComposer(base, [load_module(str(folder), name)]).merge_and_unload([1.0])
            after = evaluate_local(merged, str(test), **common).metrics
            row = catalogue.add(catalogue_uri, [str(folder)], task=name, replace=True)[0]
            manifest["modules"][name] = {
                "source": source, "uri": str(folder.resolve()), "sha256": row["sha256"], "train_examples": len(train),
                "test_examples": after["examples"], "train_seconds": round(seconds, 1),
                "loss_first": trained.losses[0], "loss_last": trained.losses[-1],
                "base_accuracy": before["accuracy"], "module_accuracy": after["accuracy"],
            }
            manifest["seconds"] = round(manifest.get("seconds", 0.0) + time.perf_counter() - start, 1)
            storage.write_json(manifest_path, manifest)
            advance(info=f"{name}: {before['accuracy']:.0f}% -> {after['accuracy']:.0f}%")
    return manifest
