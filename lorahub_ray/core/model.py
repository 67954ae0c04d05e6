"""Loading the base seq2seq model and its tokenizer from a Hub id, a local directory or ``s3://``."""

from __future__ import annotations

from pathlib import Path

import torch

from lorahub_ray.io import storage
from lorahub_ray.errors import LoraHubError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_base_model(uri: str) -> Path:
    """Resolve ``uri`` to a local directory and check, from its config alone, that it is a seq2seq
    model (cheap: no weights are read); returns the directory."""
    from transformers import AutoConfig

    path = storage.resolve(uri, what="base model")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LoraHubError(f"base model '{uri}': no usable config.json in '{path}' ({exc})") from None
    if not getattr(config, "is_encoder_decoder", False):
        raise LoraHubError(f"base model '{uri}' is a {config.model_type} model; LoraHub needs a seq2seq "
                           "(encoder-decoder) model such as Flan-T5")
    return Path(path)


def load_base_model(uri: str, *, device: str | None = None, dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer, local_path)``; the model is in eval mode on ``device``."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = check_base_model(uri)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype) if dtype else AutoModelForSeq2SeqLM.from_pretrained(path)
    model.to(device or default_device()).eval()
    return model, tokenizer, Path(path)


def load_model(uri: str | Path, *, device: str | None = None):
    """A model to evaluate: a lorahub-ray output directory (its ``model/``) or any seq2seq model."""
    from lorahub_ray.core.recipe import MODEL_DIR, RECIPE_FILE

    uri = str(uri)
    local = Path(uri)
    if local.is_dir() and (local / RECIPE_FILE).exists() and (local / MODEL_DIR).is_dir():
        uri = str(local / MODEL_DIR)
    elif storage.is_remote(uri):
        import fsspec

        fs, root = fsspec.core.url_to_fs(uri)
        if fs.exists(f"{root.rstrip('/')}/{RECIPE_FILE}"):
            uri = uri.rstrip("/") + "/" + MODEL_DIR
    model, tokenizer, _ = load_base_model(uri, device=device)
    return model, tokenizer
