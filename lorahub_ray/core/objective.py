"""The few-shot objective: a loss on the examples plus a regulariser on the weights.

Two losses, chosen by name:

``reference`` (default)
    Exactly the reference ``lorahub`` 0.1.0 ``default_get_loss``: the examples are cut into
    batches of ``batch_size``, each batch gives the model's token-mean cross-entropy, and the
    *sum over batches* is divided by the number of examples. With 5 examples and batch size 5
    (the reference's BBH script) that is ``CE / 5``; with batch size 1 it is the mean of the
    per-example CEs. The balance between loss and regulariser therefore depends on the batch size.

``mean``
    The plain mean over examples of each example's token-mean cross-entropy, independent of
    batching.

The forward passes skip the key/value cache (``use_cache=False``): a loss needs none, and building it
costs about 2% of a forward pass of Flan-T5-base on CPU. The model's family
(:mod:`lorahub_ray.core.families`) builds the batches and aligns the logits with the labels, without
letting the model compute a cross-entropy of its own next to ours.

Several candidates with a named loss share forward passes (the examples repeated once per candidate), in groups
of at most :data:`SHARED_PASS_ROWS` tokens per pass; a candidate alone in its group takes the single path, whose
adapted layers merge where that pays (:mod:`lorahub_ray.core.compose`; docs/step-cost.md says which path runs when).

The regulariser defaults to the reference's ``0.05 · mean|w|``. Both parts can be replaced by
any callable: ``loss(model, batches) -> float`` and ``regularizer(weights) -> float``. A NaN or
infinite value counts as ``+inf``, so a broken composition never crashes the search.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from lorahub_ray.core.compose import LoraComposer
from lorahub_ray.core.families import SEQ2SEQ, Family, family_of_model

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, list[Batch]], float]

# The most tokens (the examples' largest batch, padding included, times the candidates) one shared forward pass
# holds. Measured on SmolLM2-135M, one thread (docs/step-cost.md), time per candidate shared / alone: 0.88 and 0.94
# for 4 and 2 x 270 tokens, 0.92 for 4 x 530 and 2 x 790, 1.00 for 2 x 1050, 1.13 for 4 x 790 and 4 x 1050.
SHARED_PASS_ROWS = 2048


def token_losses(model, batch: Batch, candidates: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's summed token cross-entropy (float64) and its number of label tokens (padding
    labels, -100, left out), as ``[candidates, examples]``. With ``candidates`` > 1 the batch runs
    once with its rows repeated per candidate, candidate-major (see :meth:`LoraComposer.candidates`).
    The model's family (:mod:`lorahub_ray.core.families`) aligns the logits with the labels."""
    logits, labels = family_of_model(model).logits_and_labels(model, batch, candidates)
    token_ce = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                 ignore_index=-100, reduction="none").view(labels.shape)
    return token_ce.double().sum(1).view(candidates, -1), (labels != -100).sum(1).view(candidates, -1)


def reference_total(model, batches: list[Batch], candidates: int = 1) -> torch.Tensor:
    """Σ over batches of the batch's token-mean CE, per candidate (``[candidates]``)."""
    return sum(sums.sum(1) / counts.sum(1).clamp(min=1)
               for sums, counts in (token_losses(model, batch, candidates) for batch in batches))


def mean_total(model, batches: list[Batch], candidates: int = 1) -> torch.Tensor:
    """Σ over examples of the example's token-mean CE, per candidate (``[candidates]``)."""
    return sum((sums / counts.clamp(min=1)).sum(1)
               for sums, counts in (token_losses(model, batch, candidates) for batch in batches))


def num_examples(batches: list[Batch]) -> int:
    return sum(len(b["input_ids"]) for b in batches)


def _reference(model, batches: list[Batch], candidates: int = 1) -> torch.Tensor:
    return reference_total(model, batches, candidates) / num_examples(batches)


def _mean(model, batches: list[Batch], candidates: int = 1) -> torch.Tensor:
    return mean_total(model, batches, candidates) / num_examples(batches)


@torch.inference_mode()
def reference_loss(model, batches: list[Batch]) -> float:
    """Σ over batches of the batch's token-mean CE, divided by the number of examples."""
    return float(_reference(model, batches)[0])


@torch.inference_mode()
def mean_loss(model, batches: list[Batch]) -> float:
    """Mean over examples of each example's token-mean cross-entropy."""
    return float(_mean(model, batches)[0])


LOSSES: dict[str, LossFn] = {"reference": reference_loss, "mean": mean_loss}
# the named losses for several candidates in one forward pass: (model, batches, candidates) -> [candidates]
CANDIDATE_LOSSES = {reference_loss: _reference, mean_loss: _mean}


def l1_regularization(weights: Sequence[float], alpha: float = 0.05) -> float:
    """The reference regulariser: ``alpha · mean|w|``."""
    return alpha * sum(abs(float(w)) for w in weights) / len(weights)


def tokenize_examples(tokenizer, inputs: Sequence[str], outputs: Sequence[str], *, batch_size: int | None,
                      device="cpu", max_length: int = 2048, family: Family = SEQ2SEQ,
                      template: str = "plain") -> list[Batch]:
    """Loss batches of ``family`` (seq2seq: as the reference builds them, padded inputs and padded
    labels with pad -> -100; causal: see :mod:`lorahub_ray.core.families`)."""
    return family.loss_batches(tokenizer, inputs, outputs, batch_size=batch_size, device=device,
                               max_length=max_length, template=template)


class FewShotObjective:
    """``objective(weights) = loss(composed model, examples) + regularizer(weights)``.

    The examples are tokenised once; each call composes in place and runs the forward passes.
    """

    def __init__(self, composer: LoraComposer, tokenizer, inputs: Sequence[str], outputs: Sequence[str], *,
                 loss: str | LossFn = "reference", batch_size: int | None = None,
                 regularizer: Callable[[Sequence[float]], float] = l1_regularization, template: str = "plain"):
        if isinstance(loss, str):
            if loss not in LOSSES:
                raise ValueError(f"unknown loss {loss!r}; choose from {sorted(LOSSES)} or pass a callable")
            loss = LOSSES[loss]
        self.composer = composer
        self.loss_fn = loss
        self.regularizer = regularizer
        self.batches = tokenize_examples(tokenizer, inputs, outputs, batch_size=batch_size, device=composer.device,
                                         family=composer.family, template=template)
        self.shared_pass_rows = SHARED_PASS_ROWS

    def loss(self, weights: Sequence[float], modules: Sequence[int] | None = None) -> float:
        """The loss of the composition with ``weights`` (of the modules at ``modules``, the others 0:
        see :meth:`LoraComposer.compose`)."""
        self.composer.compose(weights, modules)
        return float(self.loss_fn(self.composer.model, self.batches))

    def __call__(self, weights: Sequence[float]) -> float:
        value = self.loss(weights) + float(self.regularizer(weights))
        return value if math.isfinite(value) else math.inf

    def group_size(self) -> int:
        """How many candidates share one forward pass: as many as keep it within ``shared_pass_rows`` tokens
        (the examples' largest batch, once per candidate), at least one."""
        rows = max(batch["input_ids"].numel() for batch in self.batches)
        return max(1, self.shared_pass_rows // rows)

    def losses(self, candidates: Sequence[Sequence[float]], modules: Sequence[int] | None = None) -> list[float]:
        """The loss of each candidate. With a named loss the candidates share forward passes (the
        examples repeated once per candidate), in groups of :meth:`group_size`: that costs less than
        one pass each when the passes are small, as few-shot ones are. Each value equals :meth:`loss`
        of that candidate alone up to rounding (matrix products over more rows may round differently;
        about 1e-6 relative). A custom loss, or a candidate alone in its group, runs on its own."""
        batched = CANDIDATE_LOSSES.get(self.loss_fn)
        size = self.group_size() if batched is not None else 1
        values: list[float] = []
        for start in range(0, len(candidates), size):
            group = candidates[start : start + size]
            if len(group) == 1:
                values.append(self.loss(group[0], modules))
                continue
            with torch.inference_mode(), self.composer.candidates(group, modules) as count:
                values.extend(float(v) for v in batched(self.composer.model, self.batches, count))
        return values

    def evaluate_many(self, candidates: Sequence[Sequence[float]], indices: Sequence[int] | None = None) -> list[float]:
        """``[objective(w) for w in candidates]``, sharing forward passes (see :meth:`losses`).

        With ``indices``, each candidate holds the weights of the modules at ``indices`` only: the
        others get weight 0 (the composition of the subset alone, which reads only the subset's
        rows when it is at most half of the hub), and the regulariser sees the candidate's own
        weights, as a search over that subset would."""
        losses = self.losses(candidates, indices)
        values = [loss + float(self.regularizer(w)) for loss, w in zip(losses, candidates)]
        return [v if math.isfinite(v) else math.inf for v in values]

    def evaluate_subsets(self, candidates: Sequence[Sequence[float]], subsets: Sequence[Sequence[int]]) -> list[float]:
        """:meth:`evaluate_many` for candidates that each hold the weights of their own modules
        (``subsets[i]``, module indices in the order of ``candidates[i]``): all share forward passes
        over the union of the subsets (each candidate's other modules at weight 0), and the
        regulariser sees each candidate's own weights. With one candidate, or when the union is the
        whole hub in order, this is exactly :meth:`evaluate_many` (one candidate: ``objective(w)``)."""
        union = sorted({int(m) for subset in subsets for m in subset})
        position = {m: j for j, m in enumerate(union)}
        rows = []
        for weights, subset in zip(candidates, subsets):
            row = [0.0] * len(union)
            for m, w in zip(subset, weights):
                row[position[int(m)]] = float(w)
            rows.append(row)
        whole = union == list(range(len(self.composer.modules)))
        losses = self.losses(rows, None if whole else union)
        values = [loss + float(self.regularizer(w)) for loss, w in zip(losses, candidates)]
        return [v if math.isfinite(v) else math.inf for v in values]
