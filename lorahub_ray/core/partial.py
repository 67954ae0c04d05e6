"""The few-shot objective as partial sums, for few-shot sets too large for one evaluator (pure, no Ray).

Both named losses are a sum over examples divided by a count, so a shard of the examples can
compute its part alone and the parts combine exactly:

``reference``
    ``Σ over batches of the batch's token-mean CE / number of examples``. A shard holds whole
    batches (the same batch boundaries as the unsharded objective: example ``i`` is in batch
    ``i // batch_size``), its part is ``(Σ of its batches' CE, its number of examples)``.
``mean``
    ``Σ over examples of each example's token-mean CE / number of examples``; a part is
    ``(Σ of its examples' CE, its number of examples)``.

:func:`combine` adds the parts and the regulariser: ``Σ totals / Σ counts + regularizer(w)``,
equal to :class:`lorahub_ray.core.objective.FewShotObjective` within floating-point summation order
(about 1e-7). Usage, one :class:`PartialObjective` per evaluator (a Ray actor, say)::

    ranges = shard_ranges(len(inputs), num_shards=W, batch_size=B)
    parts = [PartialObjective(composer_s, tok, inputs[r.start:r.stop], outputs[r.start:r.stop], batch_size=B)
             for r in ranges]                                  # each on its own worker
    value = combine([p(weights) for p in parts], weights)      # = FewShotObjective(...)(weights)

With ``batch_size=None`` (the reference's default: all examples in one batch) the reference
loss is one batch and cannot be split: :func:`shard_ranges` then gives a single shard; use a
batch size (or the ``mean`` loss, whose value does not depend on it) to shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lorahub_ray.errors import LoraHubError
from lorahub_ray.core.objective import Batch, l1_regularization, mean_total, num_examples, reference_total, tokenize_examples


@dataclass(frozen=True)
class Partial:
    """One shard's part of the loss: ``total / count`` summed over shards is the loss."""

    total: float
    count: int

    def __add__(self, other: "Partial") -> "Partial":
        return Partial(self.total + other.total, self.count + other.count)


def shard_ranges(num_examples: int, *, num_shards: int, batch_size: int | None) -> list[range]:
    """Split ``range(num_examples)`` into at most ``num_shards`` contiguous ranges of whole batches
    (as even as possible). Empty shards are left out, so fewer ranges may come back."""
    if num_examples < 1:
        raise LoraHubError("no examples to shard")
    if num_shards < 1:
        raise LoraHubError(f"number of shards must be at least 1, got {num_shards}")
    size = num_examples if batch_size is None else max(1, min(batch_size, num_examples))
    batches = math.ceil(num_examples / size)
    shards = min(num_shards, batches)
    ranges, first = [], 0
    for s in range(shards):
        count = batches // shards + (1 if s < batches % shards else 0)
        last = min(num_examples, (first + count) * size)
        ranges.append(range(first * size, last))
        first += count
    return ranges


# each named loss as the Σ of its terms per candidate, over ``num_examples`` examples: the terms are
# the batches' token-mean CEs for "reference" and the examples' token-mean CEs for "mean"
PARTIAL_TOTALS: dict[str, Callable[[torch.nn.Module, list[Batch], int], torch.Tensor]] = {
    "reference": reference_total, "mean": mean_total,
}


class PartialObjective:
    """One shard's loss part, ``weights -> Partial``: composes in place and runs its batches.

    ``inputs``/``outputs`` are the shard's examples (a range from :func:`shard_ranges`), cut
    into batches of ``batch_size`` exactly as the unsharded objective cuts them."""

    def __init__(self, composer, tokenizer, inputs: Sequence[str], outputs: Sequence[str], *,
                 loss: str = "reference", batch_size: int | None = None, template: str = "plain"):
        if loss not in PARTIAL_TOTALS:
            raise LoraHubError(f"loss {loss!r} cannot be computed in shards; use one of {sorted(PARTIAL_TOTALS)}")
        self.composer = composer
        self.total_fn = PARTIAL_TOTALS[loss]
        self.batches = tokenize_examples(tokenizer, inputs, outputs, batch_size=batch_size, device=composer.device,
                                         family=composer.family, template=template)
        self.count = num_examples(self.batches)

    def __call__(self, weights: Sequence[float]) -> Partial:
        return self.many([weights])[0]

    def many(self, candidates: Sequence[Sequence[float]]) -> list[Partial]:
        """Each candidate's part, the candidates sharing forward passes (as ``FewShotObjective.losses``)."""
        with torch.inference_mode(), self.composer.candidates(candidates) as count:
            totals = self.total_fn(self.composer.model, self.batches, count)
        return [Partial(float(t), self.count) for t in totals]


def combine(parts: Sequence[Partial], weights: Sequence[float],
            regularizer: Callable[[Sequence[float]], float] = l1_regularization) -> float:
    """The objective from the shards' parts: ``Σ totals / Σ counts + regularizer(weights)``;
    NaN or infinite counts as ``+inf``, as in :class:`~lorahub_ray.core.objective.FewShotObjective`."""
    total = sum((p for p in parts), Partial(0.0, 0))
    if total.count == 0:
        raise LoraHubError("no examples in the parts")
    value = total.total / total.count + float(regularizer(weights))
    return value if math.isfinite(value) else math.inf
