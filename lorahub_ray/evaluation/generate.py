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
             max_length: int = 2048, progress=None, template: str = "plain") -> list[str]:
    """Greedy generation in batches, in input order: only the generated text, as the model's family
    generates it (a causal LM with left padding, see :mod:`lorahub_ray.core.families`), each input
    rendered with ``template``."""
    # imported here: the families need torch, and Ray Data's file-check tasks import this module's importers
    from lorahub_ray.core.families import family_of_model

    family = family_of_model(model)
    outputs: list[str] = []
    for start in range(0, len(inputs), batch_size):
        chunk = list(inputs[start : start + batch_size])
        outputs.extend(family.generate(model, tokenizer, chunk, max_new_tokens=max_new_tokens, max_length=max_length,
                                       template=template))
        if progress is not None:
            progress(len(chunk))
    return outputs
