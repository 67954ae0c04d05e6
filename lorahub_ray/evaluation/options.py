"""Option log-likelihood accuracy: a multiple-choice answer scored by likelihood, not by generation.

A BBH-style prompt ends with ``Options:`` and one line per option: ``(A) ...`` lines, whose answer is the
letter, ``(A)`` (most BBH tasks, and BIG-bench's multiple choice as :mod:`lorahub_ray.io.bigbench` writes
it), or ``- ...`` lines, whose answer is the option's text (BBH's navigate, causal_judgement and
formal_fallacies: ``- Yes`` / ``- No``). :func:`answer_options` gives those answers as the target writes
them. Exact match asks the model to *write* the answer, so a small model that knows the answer but words
it otherwise scores 0. Here each answer is scored as the output of the prompt (the sum of its tokens'
log-probabilities, EOS included, through the model family's own loss batches, so with the same template
and alignment as the search's objective): the probability of the whole answer sequence, comparable
between answers of different lengths. The most likely answer is the prediction.

Inputs without an options list (generative tasks) have no option accuracy: :func:`option_accuracy`
returns ``None`` when no input has options, and scores only the ones that do otherwise.

:func:`answer_sets` extends this to a set of examples (the few-shot examples of select cv): an example's
answer set is the options its input lists, else the distinct targets of the examples when they form a closed set
(such as BBH's yes/no sports_understanding), else none.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

OPTIONS_HEADER = "\nOptions:\n"
OPTION_LINE = re.compile(r"^\(([A-Z])\) ", re.M)
DASH_LINE = re.compile(r"^- (.*\S)", re.M)


def answer_options(text: str) -> list[str]:
    """The answers a BBH-style prompt offers, as its target writes them: ``(A)``, ``(B)``, ... for lettered
    options, the option's text for ``- ...`` lines (``Yes``); ``[]`` when it has no ``Options:`` list."""
    head, sep, tail = text.rpartition(OPTIONS_HEADER)
    if not sep:
        return []
    letters = OPTION_LINE.findall(tail)
    return [f"({letter})" for letter in letters] if letters else DASH_LINE.findall(tail)


def answer_sets(inputs: Sequence[str], outputs: Sequence[str]) -> list[tuple[str, ...] | None]:
    """Each example's answer set: the options its input lists (when its target is one of them), else the
    distinct targets of the examples without options when they form a closed set (at least two, and at most
    half as many as such examples: yes/no over 5 examples, not 4 numbers among 5), else ``None`` (a
    generative example)."""
    offered = [tuple(answer_options(text)) for text in inputs]
    listed = [len(o) >= 2 and t.strip() in o for o, t in zip(offered, outputs)]
    rest = [t.strip() for t, ok in zip(outputs, listed) if not ok]
    distinct = tuple(dict.fromkeys(rest))
    closed = distinct if 2 <= len(distinct) <= len(rest) / 2 else None
    return [o if ok else closed for o, ok in zip(offered, listed)]


def option_log_likelihoods(model, tokenizer, inputs: Sequence[str], *, template: str = "plain",
                           batch_size: int = 32, max_length: int = 2048) -> list[list[float]]:
    """For each input, the log-likelihood of each of its answers (:func:`answer_options`), in order."""
    import torch

    from lorahub_ray.core.families import family_of_model

    family = family_of_model(model)
    pairs = [(i, answer) for i, text in enumerate(inputs) for answer in answer_options(text)]
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
    most likely answer, ``(X)`` or an option's text, or ``None`` for an input without options); ``None``
    when no input has options."""
    answers = [answer_options(t) for t in inputs]
    if not any(answers):
        return None
    scores = option_log_likelihoods(model, tokenizer, inputs, template=template, batch_size=batch_size)
    predictions, correct, n = [], 0, 0
    for options, score, target in zip(answers, scores, targets):
        if not options:
            predictions.append(None)
            continue
        best = options[max(range(len(options)), key=lambda j: (score[j], -j))]
        predictions.append(best)
        n += 1
        correct += best == target.strip()
    return {"accuracy": 100.0 * correct / n, "examples": n, "predictions": predictions}
