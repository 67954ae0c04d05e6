"""A module hub trained on task sources: one LoRA module per task, each scored on its own held-out split.

This is how a hub for a new base model starts, and the analogue of the paper's modules (trained on
FLAN tasks): :func:`build_hub` trains one module with :func:`lorahub_ray.core.train.train_module` on
each task source (:mod:`lorahub_ray.io.sources`: ``reasoning-gym:NAME[?config]`` by default, or
``bigbench:TASK[/SUBTASK]``), writes it to ``<output>/modules/<task>/`` and adds it, hashed, to
``<output>/catalogue.parquet``. Each task's examples are split once with ``split_seed``: up to
``train_size`` to train on (the source's ``fewshot`` split with that many ``shots``, see
:func:`lorahub_ray.io.sources.train_shots`), and a disjoint held-out ``test`` split of up to ``test_size``,
on which the base model and the merged module are both scored (exact match, with the same ``template``).

``<output>/build.json`` records the settings, and for each module: its source, example counts,
training seconds, first and last training loss, and both accuracies. It is rewritten after each
module, and a rerun with the same settings skips every module already recorded (resumable); other
settings are an error. The build is seeded (``seed`` for every module's initialisation and batch
order, a generator's own ``seed`` for its examples), so a rebuild gives the same modules.

**No BBH data.** A module's training data must not overlap the tasks it will be tested on: a ``bbh:``
source, and a BIG-bench task that is the source of a BBH task (:data:`lorahub_ray.evaluation.bbh.BBH_SOURCES`),
are refused. :data:`UPSTREAM`, the default list of 25 reasoning-gym generators, leaves out every generator
whose skill is a BBH task's (:data:`BBH_OVERLAP`, the documented mapping) and the generators the transfer
suite holds out (:data:`lorahub_ray.evaluation.bbh.TRANSFER_SUITE`). ``tasks`` may still name any generator.
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
from lorahub_ray.io import bbh, bigbench, catalogue, sources, storage
from lorahub_ray.io.examples import read_examples
from lorahub_ray.progress import progress_bar

BUILD_FILE = "build.json"
CATALOGUE_FILE = "catalogue.parquet"
MODULES_DIR = "modules"
_LOGICAL_DEDUCTION = ("logical_deduction_three_objects", "logical_deduction_five_objects",
                      "logical_deduction_seven_objects")
_TRACKING = ("tracking_shuffled_objects_three_objects", "tracking_shuffled_objects_five_objects",
             "tracking_shuffled_objects_seven_objects")
# every reasoning-gym generator whose skill is a BBH task's, and that task: none is in UPSTREAM
BBH_OVERLAP = {
    "basic_arithmetic": ("multistep_arithmetic_two",),  # nested +, -, *, / expressions
    "chain_sum": ("multistep_arithmetic_two",),
    "decimal_arithmetic": ("multistep_arithmetic_two",),
    "decimal_chain_sum": ("multistep_arithmetic_two",),
    "bitwise_arithmetic": ("multistep_arithmetic_two",),
    "circuit_logic": ("boolean_expressions",),  # evaluate a boolean circuit
    "propositional_logic": ("boolean_expressions", "formal_fallacies"),
    "syllogism": ("formal_fallacies",),  # does a conclusion follow from premises
    "acre": ("causal_judgement",),  # causal attribution (blicket detectors)
    "calendar_arithmetic": ("date_understanding",),
    "time_intervals": ("date_understanding", "temporal_sequences"),
    "knights_knaves": ("web_of_lies",),  # truth-tellers and liars
    "self_reference": ("web_of_lies",),
    "zebra_puzzles": _LOGICAL_DEDUCTION,  # place objects from ordering constraints
    "color_cube_rotation": ("reasoning_about_colored_objects", *_TRACKING),  # track colours through moves
    "leg_counting": ("object_counting",),  # count items of a list by kind
    "word_sorting": ("word_sorting",),
    "number_sorting": ("word_sorting",),
    "sentence_reordering": ("hyperbaton",),  # word order
    "maze": ("navigate",),  # follow moves on a grid
    "shortest_path": ("navigate",),
    "simple_geometry": ("geometric_shapes",),
    "advanced_geometry": ("geometric_shapes",),
}
# 25 generators with short prompts (about 50-450 characters) and short answers, of which a 135M model can learn
# some in 100 steps: their default configs, two of them shortened; none overlaps BBH (BBH_OVERLAP) or the transfer
# suite. Left out besides: generators whose questions repeat (coin_flip: 4 of 100 held-out questions are new),
# that print while generating (bf), that take 0.1 s an example (number_sequence) or have no single answer
UPSTREAM = tuple(f"reasoning-gym:{name}" for name in (
    "spell_backward", "word_sequence_reversal", "letter_counting", "letter_jumble?max_words=6", "caesar_cipher",
    "word_ladder", "palindrome_generation", "isomorphic_strings", "number_filtering", "number_format", "products",
    "gcd", "prime_factorization", "count_bits", "count_primes", "base_conversion", "simple_equations",
    "fraction_simplification", "complex_arithmetic", "power_function", "dice", "gsm_symbolic", "aiw",
    "family_relationships", "rotate_matrix?max_n=4",
))


def task_name(source: str) -> str:
    """The module's name: the task's display name (``task``, ``task_subtask``, or a generator and its config)."""
    return sources.task_name(source)


def check_upstream(tasks: Sequence[str]) -> None:
    """Refuse what is not a task source, and BBH data: ``bbh:`` sources and the BIG-bench sources of BBH
    tasks (one error naming them all)."""
    of_bbh = {v.split("/")[0]: k for k, v in BBH_SOURCES.items()}
    bad = []
    for source in tasks:
        scheme = sources.scheme_of(source)
        if scheme is None:
            raise LoraHubError(f"'{source}' is not a task source (reasoning-gym:NAME[?config], "
                               f"bigbench:TASK[/SUBTASK], a task.json or a task folder)")
        if scheme is bbh.BBH:
            bad.append(f"{source} (BBH itself)")
        elif scheme is bigbench.BIGBENCH:
            top = bigbench.sdist_task(source) or Path(sources.parse_source(source).location).name
            if top in of_bbh:
                bad.append(f"{source} (the source of BBH's {of_bbh[top]})")
    if bad:
        raise LoraHubError("a hub's modules must not be trained on BBH data; refused: " + ", ".join(bad))


def build_hub(model: str, output: str | Path, *, tasks: Sequence[str] = UPSTREAM, steps: int = 100,
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
    sources.prepare(tasks)
    plan = []
    for source in tasks:
        name = task_name(source)
        if any(name == p[0] for p in plan):
            raise LoraHubError(f"task '{name}' is listed twice")
        shots = sources.train_shots(source, train_size=train_size, test_size=test_size)
        split = dict(seed=split_seed, shots=shots, size=test_size)
        train = read_examples(sources.with_split(source, "fewshot", **split))
        test = sources.materialize(sources.with_split(source, "test", **split))
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
