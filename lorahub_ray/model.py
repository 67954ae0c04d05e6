"""Loading the base seq2seq model and its tokenizer from a Hub id, a local directory or ``s3://``."""

from __future__ import annotations

from pathlib import Path

import torch

from . import storage
from .errors import LoraHubError


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base_model(uri: str, *, device: str | None = None, dtype: torch.dtype | None = None):
    """Return ``(model, tokenizer, local_path)``; the model is in eval mode on ``device``."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer

    path = storage.resolve(uri, what="base model")
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LoraHubError(f"base model '{uri}': no usable config.json in '{path}' ({exc})") from None
    if not getattr(config, "is_encoder_decoder", False):
        raise LoraHubError(f"base model '{uri}' is a {config.model_type} model; LoraHub needs a seq2seq "
                           "(encoder-decoder) model such as Flan-T5")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSeq2SeqLM.from_pretrained(path, dtype=dtype) if dtype else AutoModelForSeq2SeqLM.from_pretrained(path)
    model.to(device or default_device()).eval()
    return model, tokenizer, Path(path)
