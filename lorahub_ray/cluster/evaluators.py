"""The few-shot objective on Ray actors. This module stays light (no nevergrad): it
is what an evaluator actor's process imports.

:class:`Evaluator` (used by the Ray search, :mod:`lorahub_ray.cluster.restarts`) holds the base
model with all K modules stacked and the examples, and returns the objective of each candidate of
its share of a round in one call, the candidates sharing forward passes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence



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

    def evaluate_subsets(self, candidates: Sequence[Sequence[float]], subsets: Sequence[Sequence[int]]) -> list[float]:
        """Each candidate with its own modules (see :meth:`FewShotObjective.evaluate_subsets`)."""
        return self.objective.evaluate_subsets(candidates, subsets)
