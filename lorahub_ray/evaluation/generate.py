"""Batched greedy generation and exact-match accuracy, normalised like the reference."""

from __future__ import annotations

from collections.abc import Sequence


def normalize(text: str) -> str:
    """The reference's normalisation: strip, lower-case, drop '.'."""
    return text.strip().lower().replace(".", "")


def exact_match(prediction: str, target: str) -> bool:
    return normalize(prediction) == normalize(target)


def accuracy(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Exact-match accuracy in percent."""
    if not targets:
        return 0.0
    return 100.0 * sum(exact_match(p, t) for p, t in zip(predictions, targets)) / len(targets)


def generate(model, tokenizer, inputs: Sequence[str], *, batch_size: int = 32, max_new_tokens: int = 64,
             max_length: int = 2048, progress=None) -> list[str]:
    """Greedy generation in batches, in input order."""
    import torch

    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(inputs), batch_size):
        chunk = list(inputs[start : start + batch_size])
        enc = tokenizer(chunk, max_length=max_length, truncation=True, padding=True, return_tensors="pt").to(device)
        with torch.inference_mode():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        outputs.extend(tokenizer.batch_decode(ids.cpu(), skip_special_tokens=True))
        if progress is not None:
            progress(len(chunk))
    return outputs
