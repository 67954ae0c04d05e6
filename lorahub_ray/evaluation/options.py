"""Option log-likelihood accuracy: a multiple-choice answer scored by likelihood, not by generation.

A BBH-style prompt (:mod:`lorahub_ray.io.bigbench`) ends with ``Options:`` and one ``(A) ...`` line per
option; its answer is the letter, ``(A)``. Exact match asks the model to *write* that answer, so a
small model that knows the answer but words it otherwise scores 0. Here each option's answer text
``(X)`` is scored as the output of the prompt (the sum of its tokens' log-probabilities, EOS included,
through the model family's own loss batches, so with the same template and alignment as the search's
objective) and the most likely option is the prediction. All options of an example share its prompt,
so every option has the same length in tokens and sums are comparable.

Inputs without an options list (generative tasks) have no option accuracy: :func:`option_accuracy`
returns ``None`` when no input has options, and scores only the ones that do otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

OPTIONS_HEADER = "\nOptions:\n"
OPTION_LINE = re.compile(r"^\(([A-Z])\) ", re.M)


def option_letters(text: str) -> list[str]:
    """The option letters of a BBH-style prompt (``[]`` when it has no ``Options:`` list)."""
    head, sep, tail = text.rpartition(OPTIONS_HEADER)
    return OPTION_LINE.findall(tail) if sep else []


def option_log_likelihoods(model, tokenizer, inputs: Sequence[str], *, template: str = "plain",
                           batch_size: int = 32, max_length: int = 2048) -> list[list[float]]:
    """For each input, the log-likelihood of each of its options' answers ``(X)``, in letter order."""
    import torch

    from lorahub_ray.core.families import family_of_model

    family = family_of_model(model)
    pairs = [(i, f"({letter})") for i, text in enumerate(inputs) for letter in option_letters(text)]
    device = next(model.parameters()).device
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            for batch in family.loss_batches(tokenizer, [inputs[i] for i, _ in chunk], [a for _, a in chunk],
                                             batch_size=None, device=device, max_length=max_length, template=template):
                logits, labels = family.logits_and_labels(model, batch)
                logp = torch.log_softmax(logits.float(), dim=-1)
                keep = labels != -100
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                scores.extend((picked * keep).sum(-1).tolist())
    out: list[list[float]] = [[] for _ in inputs]
    for (i, _), score in zip(pairs, scores):
        out[i].append(score)
    return out


def option_accuracy(model, tokenizer, inputs: Sequence[str], targets: Sequence[str], *, template: str = "plain",
                    batch_size: int = 32) -> dict | None:
    """``{"accuracy": %, "examples": n, "predictions": [...]}`` over the inputs that list options (the
    most likely option's answer, ``(X)``, or ``None`` for an input without options); ``None`` when
    no input has options."""
    letters = [option_letters(t) for t in inputs]
    if not any(letters):
        return None
    scores = option_log_likelihoods(model, tokenizer, inputs, template=template, batch_size=batch_size)
    predictions, correct, n = [], 0, 0
    for options, score, target in zip(letters, scores, targets):
        if not options:
            predictions.append(None)
            continue
        best = options[max(range(len(options)), key=lambda j: (score[j], -j))]
        predictions.append(f"({best})")
        n += 1
        correct += f"({best})" == target.strip()
    return {"accuracy": 100.0 * correct / n, "examples": n, "predictions": predictions}
