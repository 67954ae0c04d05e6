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

    def __init__(self, model: str, modules, inputs=None, outputs=None, *, loss, batch_size, regularizer, device,
                 threads, template: str = "plain"):
        import torch

        from lorahub_ray.core.compose import LoraComposer
        from lorahub_ray.core.model import load_base_model

        if threads:
            torch.set_num_threads(threads)
        base, self.tokenizer, _ = load_base_model(model, device=device)
        self.composer = LoraComposer(base, modules)
        self.options = dict(loss=loss, batch_size=batch_size, regularizer=regularizer, template=template)
        self.objective = None
        if inputs is not None:
            self.set_examples(inputs, outputs)

    def set_examples(self, inputs: Sequence[str], outputs: Sequence[str]) -> int:
        """Take another task's examples (tokenised here); the model and the modules stay loaded."""
        from lorahub_ray.core.objective import FewShotObjective

        self.objective = FewShotObjective(self.composer, self.tokenizer, inputs, outputs, **self.options)
        return len(inputs)

    def ready(self) -> dict:
        import ray

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def evaluate_many(self, candidates: Sequence[Sequence[float]], indices: Sequence[int] | None = None) -> list[float]:
        return self.objective.evaluate_many(candidates, indices)

    def losses(self, candidates: Sequence[Sequence[float]], indices: Sequence[int] | None = None) -> list[float]:
        """The losses without the regulariser (see :meth:`FewShotObjective.losses`): preselection's scores."""
        return list(self.objective.losses(candidates, indices))

    def evaluate_subsets(self, candidates: Sequence[Sequence[float]], subsets: Sequence[Sequence[int]]) -> list[float]:
        """Each candidate with its own modules (see :meth:`FewShotObjective.evaluate_subsets`)."""
        return self.objective.evaluate_subsets(candidates, subsets)
