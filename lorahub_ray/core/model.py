"""Loading the base model and its tokenizer from a Hub id, a local directory, ``s3://`` or a ``.gguf``
file; the model's family (:mod:`lorahub_ray.core.families`: seq2seq or causal LM) is read from its
config and does the loading."""

from __future__ import annotations

from pathlib import Path

import torch

from lorahub_ray.core import gguf
from lorahub_ray.core.families import Family, family_of
from lorahub_ray.errors import LoraHubError
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


def load_model(uri: str | Path, *, device: str | None = None):
    """A model to evaluate: a lorahub-ray output directory (its ``model/``) or any base model."""
    from lorahub_ray.core.recipe import MODEL_DIR, RECIPE_FILE

    uri = str(uri)
    local = Path(uri)
    if local.is_dir() and (local / RECIPE_FILE).exists() and (local / MODEL_DIR).is_dir():
        uri = str(local / MODEL_DIR)
    elif storage.is_remote(uri) and not gguf.is_gguf(uri):
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        if fs.exists(f"{root.rstrip('/')}/{RECIPE_FILE}"):
            uri = uri.rstrip("/") + "/" + MODEL_DIR
    model, tokenizer, _ = load_base_model(uri, device=device)
    return model, tokenizer
