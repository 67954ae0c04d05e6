"""Loading models: the base model and its tokenizer from a Hub id, a local directory, ``s3://`` or a
``.gguf`` file (the model's family, :mod:`lorahub_ray.core.families`: seq2seq or causal LM, is read
from its config and does the loading), and the composed model of a run directory (:func:`load_model`)
or of a recipe (:func:`build_model`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorahub_ray.core import gguf
from lorahub_ray.core.adapter import apply_adapter, local_adapter
from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.families import Family, family_of
from lorahub_ray.core.modules import check_compatible, load_module
from lorahub_ray.core.recipe import ADAPTER_DIR, MODEL_DIR, Recipe, run_files
from lorahub_ray.errors import IntegrityError, LoraHubError
from lorahub_ray.io import storage


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def base_family(uri: str) -> tuple[Path, Family]:
    """Resolve ``uri`` to a local directory (a ``.gguf`` file is converted once and cached, see
    :mod:`lorahub_ray.core.gguf`) and read its family from the config (no weights are read)."""
    from transformers import AutoConfig

    path = gguf.converted_directory(uri) if gguf.is_gguf(uri) else storage.resolve(uri, what="base model")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LoraHubError(f"base model '{uri}': no usable config.json in '{path}' ({exc})") from None
    return Path(path), family_of(config, what=f"base model '{uri}'")


def check_base_model(uri: str) -> Path:
    """Resolve ``uri`` to a local directory and check from its config that it is a model LoraHub can
    compose for (a seq2seq or a causal LM); returns the directory."""
    return base_family(uri)[0]


def base_model_sha256(path: Path) -> str:
    """What a recipe records of its base model: the ``.gguf`` file's sha256 for a converted one, else
    the content hash of the directory."""
    return gguf.recorded_sha256(path) or storage.sha256_dir(path)


def load_base_model(uri: str, *, device: str | None = None, dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer, local_path)``; the model is in eval mode on ``device``."""
    from transformers import AutoTokenizer

    path, family = base_family(uri)
    tokenizer = family.prepare_tokenizer(AutoTokenizer.from_pretrained(path))
    model = family.load(path, dtype=dtype)
    model.to(device or default_device()).eval()
    return model, tokenizer, path


def load_model(uri: str | Path, *, device: str | None = None, verify: bool = True):
    """A model to evaluate, with its tokenizer: any base model (see :func:`load_base_model`), or a
    lorahub-ray run directory (local or ``s3://``), whose composed model is

    * its ``model/``, when the run wrote one (``--merge``; and every output before the adapter), as it is;
    * else the recipe's base model with the run's ``adapter/`` merged in at load;
    * else (a directory with ``recipe.json`` alone) rebuilt from the recipe's modules (:func:`build_model`).

    With ``verify`` the recipe's hashes are checked: the base model's, and the adapter's or the modules'.
    """
    uri = str(uri)
    run = None if gguf.is_gguf(uri) else run_files(uri)
    if run is None or run.model:
        model, tokenizer, _ = load_base_model(uri if run is None else run.path(MODEL_DIR), device=device)
        return model, tokenizer
    recipe = Recipe.load(uri)
    if not run.adapter:
        return build_model(recipe, device=device, verify=verify)
    adapter = local_adapter(run.path(ADAPTER_DIR), expected_sha256=recipe.adapter_sha256 if verify else None)
    base, tokenizer = recipe_base_model(recipe, device=device, verify=verify)
    return apply_adapter(base, adapter), tokenizer


def recipe_base_model(recipe: Recipe, *, device: str | None = None, verify: bool = True):
    """The recipe's base model and tokenizer; with ``verify`` its content must be the one the recipe
    records."""
    base, tokenizer, base_path = load_base_model(recipe.base_model, device=device)
    if verify and base_model_sha256(base_path) != recipe.base_model_sha256:
        raise IntegrityError(f"base model '{recipe.base_model}' differs from the one the recipe was made with")
    return base, tokenizer


def build_model(recipe: Recipe | str | Path, *, device: str | None = None, verify: bool = True):
    """Rebuild the merged model of a recipe from its base model and modules: ``(model, tokenizer)``.

    With ``verify`` the content hashes recorded in the recipe are checked, so a changed module
    or base model is a clear error instead of a silently different model.
    """
    if not isinstance(recipe, Recipe):
        recipe = Recipe.load(recipe)
    modules = [load_module(m["uri"], m["name"], expected_sha256=m["sha256"] if verify else None)
               for m in recipe.modules]
    check_compatible(modules)
    base, tokenizer = recipe_base_model(recipe, device=device, verify=verify)
    return LoraComposer(base, modules, merge_method=recipe.merge_method).merge_and_unload(recipe.weights), tokenizer
