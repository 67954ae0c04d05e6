"""The few-shot objective on Ray actors. This module stays light (no nevergrad, no Ray Tune): it
is what an evaluator actor's process imports.

:class:`Evaluator` (used by the Ray Tune search) holds the base model with all K modules stacked
and the examples, and returns the whole objective for a weight vector.

For larger few-shot sets the objective is sharded, a thin layer over :mod:`lorahub_ray.core.partial`:
each :class:`ShardEvaluator` actor loads the base model and the modules once, holds one shard
of the examples (whole batches) and returns its :class:`~lorahub_ray.core.partial.Partial` for a
weight vector; :class:`ShardedObjective` asks every actor and combines the parts, so one
evaluation's cost divides across the workers::

    objective = ShardedObjective(base, module_uris, "fewshot.jsonl", workers=4, batch_size=32)
    result = minimize(objective, objective.dim, budget=40, evaluate_batch=objective.evaluate_batch)
    objective.close()
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from lorahub_ray.errors import LoraHubError
from lorahub_ray.core.objective import l1_regularization
from lorahub_ray.core.partial import PARTIAL_TOTALS, Partial, PartialObjective, combine, shard_ranges


class Evaluator:
    """Holds the base model with the K modules stacked in one LoRA slot and the tokenised examples.

    ``evaluate_many(candidates, indices)`` returns each candidate's objective, the candidates
    sharing forward passes; a candidate holds the weights of the modules at ``indices`` (all
    modules when ``None``; the others get weight 0, which is the composition of the subset alone).
    """

    def __init__(self, model: str, modules, inputs, outputs, *, loss, batch_size, regularizer, device, threads,
                 template: str = "plain"):
        import torch

        from lorahub_ray.core.compose import LoraComposer
        from lorahub_ray.core.model import load_base_model
        from lorahub_ray.core.objective import FewShotObjective

        if threads:
            torch.set_num_threads(threads)
        base, tokenizer, _ = load_base_model(model, device=device)
        self.objective = FewShotObjective(LoraComposer(base, modules), tokenizer, inputs, outputs, loss=loss,
                                          batch_size=batch_size, regularizer=regularizer, template=template)

    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def evaluate_many(self, candidates: Sequence[Sequence[float]], indices: Sequence[int] | None = None) -> list[float]:
        return self.objective.evaluate_many(candidates, indices)


class ShardEvaluator:
    """Holds the composer and one shard's :class:`PartialObjective` (run as a Ray actor)."""

    def __init__(self, model: str, modules: Sequence[str], inputs: Sequence[str], outputs: Sequence[str], *,
                 loss: str = "reference", batch_size: int | None = None, device: str | None = None):
        from lorahub_ray.core.compose import LoraComposer
        from lorahub_ray.core.model import load_base_model
        from lorahub_ray.core.modules import load_modules

        loaded = load_modules(list(modules))
        base, tokenizer, _ = load_base_model(model, device=device)
        self.partial = PartialObjective(LoraComposer(base, loaded), tokenizer, inputs, outputs, loss=loss,
                                        batch_size=batch_size)

    def __call__(self, weights: Sequence[float]) -> Partial:
        return self.partial(weights)

    def many(self, candidates: Sequence[Sequence[float]]) -> list[Partial]:
        return self.partial.many(candidates)


class ShardedObjective:
    """``weights -> objective`` computed as partial sums on ``workers`` Ray actors.

    Equal to :class:`~lorahub_ray.core.objective.FewShotObjective` with the same ``loss`` and
    ``batch_size`` within 1e-6. ``evaluate_batch`` evaluates several candidates in one round
    trip (for :func:`lorahub_ray.core.search.minimize` with ``num_workers > 1``)."""

    def __init__(self, model: str, modules: Sequence[str], examples, *, workers: int, loss: str = "reference",
                 batch_size: int | None = None, regularizer: Callable[[Sequence[float]], float] = l1_regularization,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0, device: str | None = None,
                 input_field: str = "input", output_field: str = "output"):
        import ray

        from lorahub_ray.io.examples import as_examples
        from lorahub_ray.core.modules import load_modules
        from lorahub_ray.cluster.connect import connect, runtime_env

        if loss not in PARTIAL_TOTALS:
            raise LoraHubError(f"loss {loss!r} cannot be computed in shards; use one of {sorted(PARTIAL_TOTALS)}")
        data = as_examples(examples, input_field=input_field, output_field=output_field)  # checked first
        self.dim = len(load_modules(list(modules)))  # checks the modules before any actor starts
        self.regularizer = regularizer
        self.ranges = shard_ranges(len(data), num_shards=workers, batch_size=batch_size)
        connect()
        options = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        if runtime_env():
            options["runtime_env"] = runtime_env()
        actor = ray.remote(ShardEvaluator).options(**options)
        self.actors = [
            actor.remote(model, list(modules), data.inputs[r.start : r.stop], data.outputs[r.start : r.stop],
                         loss=loss, batch_size=batch_size,
                         device=device or ("cuda" if gpus_per_worker > 0 else "cpu"))
            for r in self.ranges
        ]

    def __call__(self, weights: Sequence[float]) -> float:
        return self.evaluate_batch([list(weights)])[0]

    def evaluate_batch(self, candidates: Sequence[Sequence[float]]) -> list[float]:
        import ray

        candidates = [[float(x) for x in w] for w in candidates]
        per_actor = ray.get([a.many.remote(candidates) for a in self.actors])
        return [combine([parts[i] for parts in per_actor], w, self.regularizer) for i, w in enumerate(candidates)]

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
