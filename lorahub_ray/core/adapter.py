"""The composed module as a PEFT LoRA adapter: what every run writes as ``adapter/``, and loading it back.

LoraHub's composition, ``A = Σ wᵢ·Aᵢ`` and ``B = Σ wᵢ·Bᵢ`` (A and B summed separately, the reference
rule: :data:`lorahub_ray.core.compose.MERGE_METHODS`), is itself a LoRA adapter of the modules' rank and
alpha. :func:`save_adapter` computes it from the modules' tensors and the weights alone, with no model
loaded, and writes it in PEFT's format:

* ``adapter_config.json``: the modules' LoRA config, with ``base_model_name_or_path`` set to the run's
  base model;
* ``adapter_model.safetensors``: the composed A and B in float32 (the precision the composer sums in),
  under the modules' own tensor names.

So ``PeftModel.from_pretrained(base, "runs/task/adapter")`` gives the model the search scored, and any
server of LoRA adapters on one base (vLLM, LoRAX, Ray Serve LLM) can take it. Its size is the modules'
(a few hundred kB to a few MB), where a merged model is the whole base.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from lorahub_ray.core.compose import MERGE_METHODS
from lorahub_ray.core.modules import SAFETENSORS_FILE, LoraModule
from lorahub_ray.core.recipe import Recipe
from lorahub_ray.errors import IntegrityError, LoraHubError
from lorahub_ray.io import storage

DTYPE = torch.float32  # the composer sums in the LoRA parameters' dtype, which PEFT keeps in float32


def composed_state_dict(modules: Sequence[LoraModule], weights: Sequence[float],
                        merge_method: str = "linear") -> dict[str, torch.Tensor]:
    """The composed LoRA tensors, under the modules' tensor names: each is ``merge_method`` (the
    composer's own function) applied to the modules' tensors of that name, stacked, with ``weights``.
    One name at a time, so the memory needed is the modules' size for one layer."""
    if len(modules) != len(weights) or not modules:
        raise ValueError(f"expected one weight per module, got {len(weights)} weights for {len(modules)} modules")
    merge = MERGE_METHODS[merge_method]
    w = torch.tensor([float(x) for x in weights], dtype=DTYPE)
    composed = {}
    for key, first in modules[0].state_dict.items():
        stacked = torch.stack([m.state_dict[key].detach().to("cpu", DTYPE).reshape(-1) for m in modules])
        composed[key] = merge(w, stacked, torch.empty(stacked.shape[1], dtype=DTYPE), None).view(first.shape)
    return composed


def adapter_config(modules: Sequence[LoraModule], base_model: str) -> dict:
    """The modules' LoRA config (they agree on every field that the sum depends on: rank, alpha,
    targets, ...), for inference, naming ``base_model``."""
    return {**modules[0].config, "base_model_name_or_path": str(base_model), "inference_mode": True}


def save_adapter(directory: str | Path, recipe: Recipe, modules: Sequence[LoraModule]) -> str:
    """Write the recipe's composition of ``modules`` (the recipe's modules, in its order) as a PEFT
    adapter into the local ``directory``; returns the directory's sha256, which the recipe records
    (``adapter_sha256``) so that a changed adapter is found at load."""
    from safetensors.torch import save_file

    recorded = [(m["name"], m["sha256"]) for m in recipe.modules]
    given = [(m.name, m.sha256) for m in modules]
    if given != recorded:
        raise ValueError(f"the modules {[n for n, _ in given]} are not the recipe's {[n for n, _ in recorded]}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(composed_state_dict(modules, recipe.weights, recipe.merge_method), str(directory / SAFETENSORS_FILE),
              metadata={"format": "pt"})
    config = adapter_config(modules, recipe.base_model)
    (directory / storage.ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return storage.sha256_dir(directory)


def local_adapter(uri: str, *, expected_sha256: str | None = None) -> Path:
    """The adapter directory at ``uri`` (local or ``s3://``, copied to the cache) as a local path, its
    content checked against ``expected_sha256`` when given."""
    path = storage.resolve(uri, what="adapter")
    if not (path / storage.ADAPTER_CONFIG).is_file():
        raise LoraHubError(f"adapter '{uri}' has no {storage.ADAPTER_CONFIG}")
    if expected_sha256 is not None:
        digest = storage.sha256_dir(path)
        if digest != expected_sha256:
            raise IntegrityError(f"adapter '{uri}' has changed: sha256 {digest[:12]}… but {expected_sha256[:12]}… "
                                 "was recorded in the recipe")
    return path


def apply_adapter(base, path: str | Path):
    """``base`` with the PEFT LoRA adapter at the local ``path`` merged into its weights: a plain
    transformers model, as fast at inference as the base (``base`` is changed in place)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()
