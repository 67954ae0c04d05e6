"""Hosting composed models for serving, without Ray: the part of ``lorahub-ray serve`` that a
Serve replica (and the benchmark's in-process baseline) runs.

A :class:`ModelHost` holds the models of a set of registered recipes in one of two ways:

* ``merged``: one merged model per recipe, as :func:`lorahub_ray.core.model.load_model` loads a run
  directory: its ``model/`` when the run wrote one (``--merge``), else the base model with the run's
  ``adapter/`` merged in at load, else rebuilt from the recipe's modules. No LoRA work at inference:
  the fastest path, at the memory cost of one full model per recipe.
* ``composed``: one :class:`~lorahub_ray.core.compose.LoraComposer` per base model, holding the union
  of the recipes' modules stacked once. Serving a recipe writes its composition into the LoRA slot
  in place (``compose(weights)``: one matrix-vector product, milliseconds), so many recipes share
  one copy of the base model.

``auto`` picks ``merged`` for one recipe and ``composed`` for several.

Recipe ids are names given by whoever configures the server; requests only look them up in
:attr:`ModelHost.recipes`, never use them as paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from lorahub_ray.io import storage
from lorahub_ray.errors import LoraHubError
from lorahub_ray.core.recipe import RECIPE_FILE, Recipe

MODES = ("auto", "merged", "composed")
RECIPE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ServeConfigError(LoraHubError):
    """A bad serving configuration: unknown mode, bad or repeated recipe id, unreadable recipe."""


@dataclasses.dataclass(frozen=True)
class RecipeSpec:
    """A recipe to serve: its public id and where its directory is (local path or ``s3://``)."""

    id: str
    path: str

    @classmethod
    def parse(cls, item: str | dict | RecipeSpec) -> RecipeSpec:
        """``"DIR"`` (id: the directory's name), ``"ID=DIR"`` or ``{"id": ..., "path": ...}``."""
        if isinstance(item, RecipeSpec):
            return item
        if isinstance(item, dict):
            if "path" not in item:
                raise ServeConfigError(f"recipe entry {item!r} lacks 'path'")
            path = str(item["path"])
            rid = str(item.get("id") or _default_id(path))
        else:
            text = str(item)
            rid, sep, path = text.partition("=")
            if not sep or "/" in rid or not rid:  # no "id=" prefix (an '=' inside a path is allowed)
                rid, path = _default_id(text), text
        if not RECIPE_ID.match(rid):
            raise ServeConfigError(f"recipe id {rid!r} (for '{path}') must be 1-64 characters of letters, digits, "
                                   "'.', '_' or '-', starting with a letter or digit")
        return cls(rid, path)


def _default_id(path: str) -> str:
    return str(path).rstrip("/").split("/")[-1]


def parse_specs(items: Sequence[str | dict | RecipeSpec]) -> list[RecipeSpec]:
    """Parse and check recipe entries: at least one, ids valid and unique. Touches no file."""
    specs = [RecipeSpec.parse(i) for i in items]
    if not specs:
        raise ServeConfigError("no recipes to serve: give at least one recipe directory")
    seen: dict[str, str] = {}
    for s in specs:
        if s.id in seen:
            raise ServeConfigError(f"recipe id '{s.id}' is used twice ('{seen[s.id]}' and '{s.path}'); "
                                   "give distinct ids as ID=DIR")
        seen[s.id] = s.path
    return specs


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ServeConfigError(f"unknown serving mode {mode!r}; choose from {', '.join(MODES)}")
    return mode


def effective_mode(mode: str, n_recipes: int) -> str:
    check_mode(mode)
    if mode == "auto":
        return "merged" if n_recipes == 1 else "composed"
    return mode


def load_recipes(specs: Sequence[RecipeSpec]) -> dict[str, Recipe]:
    """Read every ``recipe.json`` (small files; no model is loaded). Errors name the recipe."""
    recipes = {}
    for s in specs:
        try:
            recipes[s.id] = Recipe.load(s.path)
        except LoraHubError as exc:
            raise ServeConfigError(f"recipe '{s.id}': {exc}") from None
    return recipes


def describe(spec: RecipeSpec, recipe: Recipe, mode: str) -> dict:
    """What ``GET /recipes`` shows of a recipe."""
    return {
        "id": spec.id,
        "base_model": recipe.base_model,
        "modules": [{"name": m["name"], "uri": m["uri"], "sha256": m["sha256"]} for m in recipe.modules],
        "weights": recipe.module_weights,
        "merge_method": recipe.merge_method,
        "template": recipe.template,
        "objective": recipe.objective,
        "mode": mode,
    }


class _Group:
    """Recipes over one base model served through one LoraComposer."""

    def __init__(self, composer, tokenizer, weights: dict[str, list[float]]):
        self.composer = composer
        self.tokenizer = tokenizer
        self.weights = weights
        self.active: str | None = None


class ModelHost:
    """The models of a set of recipes, and thread-safe generation with any of them.

    Only one generation runs at a time (a lock), which also keeps the in-place composition of a
    shared LoRA slot from changing under a running generation.
    """

    def __init__(self, recipes: Sequence[str | dict | RecipeSpec], *, mode: str = "auto", device: str | None = None,
                 verify: bool = True, generate_batch_size: int = 64):
        self.specs = parse_specs(recipes)
        self.mode = effective_mode(mode, len(self.specs))
        self.recipes = load_recipes(self.specs)
        self.generate_batch_size = generate_batch_size
        self._lock = threading.Lock()
        self._merged: dict[str, tuple[object, object]] = {}
        self._groups: dict[str, _Group] = {}  # recipe id -> its group (shared between recipes)
        self.calls = 0
        self.inputs_generated = 0
        self.switches = 0
        self.switch_seconds = 0.0
        self.last_switch_seconds: float | None = None
        if self.mode == "merged":
            for s in self.specs:
                self._merged[s.id] = self._load_merged(s, device, verify)
        else:
            self._load_composed(device, verify)

    # --- loading -----------------------------------------------------------------------------

    @staticmethod
    def _load_merged(spec: RecipeSpec, device, verify):
        from lorahub_ray.core.model import load_model

        return load_model(spec.path, device=device, verify=verify)

    def _load_composed(self, device, verify) -> None:
        from lorahub_ray.core.compose import LoraComposer
        from lorahub_ray.core.model import base_model_sha256, load_base_model
        from lorahub_ray.core.modules import check_compatible, load_module

        by_base: dict[tuple[str, str], list[str]] = {}
        for s in self.specs:
            r = self.recipes[s.id]
            by_base.setdefault((r.base_model_sha256, r.merge_method), []).append(s.id)
        for (base_sha, merge_method), ids in by_base.items():
            # the union of the group's modules, each loaded once (same content = same module)
            modules, index = [], {}
            for rid in ids:
                for m in self.recipes[rid].modules:
                    if m["sha256"] in index:
                        continue
                    module = load_module(m["uri"], m["name"], expected_sha256=m["sha256"] if verify else None)
                    if any(x.name == module.name for x in modules):
                        module = dataclasses.replace(module, name=f"{module.name}@{module.sha256[:8]}")
                    index[m["sha256"]] = len(modules)
                    modules.append(module)
            try:
                check_compatible(modules)
            except LoraHubError as exc:
                raise ServeConfigError(f"recipes {', '.join(ids)} cannot share one base model: {exc}") from None
            first = self.recipes[ids[0]]
            base, tokenizer, base_path = load_base_model(first.base_model, device=device)
            if verify and base_model_sha256(base_path) != base_sha:
                from lorahub_ray.errors import IntegrityError

                raise IntegrityError(f"base model '{first.base_model}' of recipe '{ids[0]}' differs from the one "
                                     "the recipe was made with")
            weights = {}
            for rid in ids:
                w = [0.0] * len(modules)
                for m, wi in zip(self.recipes[rid].modules, self.recipes[rid].weights):
                    w[index[m["sha256"]]] += float(wi)
                weights[rid] = w
            group = _Group(LoraComposer(base, modules, merge_method=merge_method), tokenizer, weights)
            for rid in ids:
                self._groups[rid] = group

    # --- serving -----------------------------------------------------------------------------

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.specs]

    def describe(self) -> list[dict]:
        return [describe(s, self.recipes[s.id], self.mode) for s in self.specs]

    def _select(self, recipe_id: str):
        """The model and tokenizer for ``recipe_id``, switching a shared LoRA slot if needed. Hold the lock."""
        if recipe_id in self._merged:
            return self._merged[recipe_id]
        group = self._groups.get(recipe_id)
        if group is None:
            raise KeyError(recipe_id)
        if group.active != recipe_id:
            start = time.perf_counter()
            group.composer.compose(group.weights[recipe_id])
            seconds = time.perf_counter() - start
            group.active = recipe_id
            self.switches += 1
            self.switch_seconds += seconds
            self.last_switch_seconds = seconds
        return group.composer.model, group.tokenizer

    @contextlib.contextmanager
    def selected(self, recipe_id: str, inputs: int):
        """``(model, tokenizer, template)`` of the recipe, held (under the lock) for one generation of
        ``inputs`` inputs (``KeyError`` for an unknown id)."""
        with self._lock:
            model, tokenizer = self._select(recipe_id)
            self.calls += 1
            self.inputs_generated += inputs
            yield model, tokenizer, self.recipes[recipe_id].template

    def tokenizer(self, recipe_id: str):
        """The recipe's tokenizer, to render chat templates outside the lock (never to tokenise)."""
        if recipe_id in self._merged:
            return self._merged[recipe_id][1]
        return self._groups[recipe_id].tokenizer

    def generate(self, recipe_id: str, inputs: Sequence[str], *, max_new_tokens: int = 64) -> list[str]:
        """Greedy generation with the recipe's composed model (``KeyError`` for an unknown id)."""
        from lorahub_ray.evaluation.generate import generate

        with self.selected(recipe_id, len(inputs)) as (model, tokenizer, template):
            return generate(model, tokenizer, list(inputs), batch_size=self.generate_batch_size,
                            max_new_tokens=max_new_tokens, template=template)

    def switch(self, recipe_id: str) -> float:
        """Make ``recipe_id`` the active composition now; the seconds it took (0 when merged or already active)."""
        with self._lock:
            before = self.switches
            self._select(recipe_id)
            return self.last_switch_seconds if self.switches > before else 0.0

    def stats(self) -> dict:
        import torch

        return {"mode": self.mode, "recipes": len(self.specs), "torch_threads": torch.get_num_threads(),
                "generate_calls": self.calls, "inputs": self.inputs_generated, "switches": self.switches,
                "mean_switch_ms": 1000 * self.switch_seconds / self.switches if self.switches else None}


def check_recipe_dirs(specs: Sequence[RecipeSpec]) -> None:
    """Cheap checks before starting a server: every recipe has a ``recipe.json`` that parses."""
    for s in specs:
        if not storage.is_remote(s.path):
            local = Path(s.path).expanduser()
            if not local.is_dir():
                raise ServeConfigError(f"recipe '{s.id}': '{s.path}' is not a directory")
            if not (local / RECIPE_FILE).is_file():
                raise ServeConfigError(f"recipe '{s.id}': no {RECIPE_FILE} in '{s.path}'")
    load_recipes(specs)
