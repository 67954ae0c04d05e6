"""``--select cv`` with its folds on Ray: the cross-validation of :mod:`lorahub_ray.core.selection`,
one fold per call, on W actors that each hold the model.

The folds are independent searches (every search candidate refit on the fold's examples), so they
are what a cluster's extra capacity is good for. :class:`RayFolds` is a ``map_folds`` for
:func:`lorahub_ray.core.selection.select` and ``lorahub_learning(select="cv", map_folds=...)``:

* it starts ``min(workers, folds)`` :class:`FoldWorker` actors; each loads the base model once,
  takes the searched modules from the object store and builds a context equal to the driver's
  (:meth:`~lorahub_ray.core.selection.SelectionContext.spec`);
* an ``ActorPool`` hands out the folds and yields each result as it finishes. A fold's result
  depends on the fold alone, not on the actor that ran it, so the selection is the one the
  sequential folds give (tested); the winner's refit runs in the driver, as in one process;
* actors that die are restarted by Ray and their fold retried; the actors are killed at the end,
  and a local Ray that this call started is shut down.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import ray
from ray.util import ActorPool

from lorahub_ray.cluster.connect import connect, default_cpus_per_worker, runtime_env
from lorahub_ray.cluster.evaluators import check_resources, wait_for_evaluators
from lorahub_ray.core.selection import FoldResult, FoldTask, SelectionContext
from lorahub_ray.errors import LoraHubError


class FoldWorker:
    """Holds the base model with the searched modules and a :class:`SelectionContext` equal to the driver's."""

    def __init__(self, model: str, modules, merge_method: str, spec: dict, *, device: str | None, threads: int):
        import torch

        from lorahub_ray.core.compose import LoraComposer
        from lorahub_ray.core.model import load_base_model

        torch.set_num_threads(threads)
        base, tokenizer, _ = load_base_model(model, device=device)
        composer = LoraComposer(base, modules, merge_method=merge_method)
        self.context = SelectionContext(composer, tokenizer, **{**spec, "device": device})

    def ready(self) -> dict:
        import os

        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def run_fold(self, task: FoldTask) -> FoldResult:
        return self.context.run_fold(task)


class RayFolds:
    """``map_folds`` on ``workers`` Ray actors (a local Ray, or the cluster at ``address``; see
    :func:`lorahub_ray.cluster.connect.connect`), each with ``cpus_per_worker`` (default an equal
    share, at most 1) and ``gpus_per_worker`` (fractions share a GPU)."""

    def __init__(self, workers: int = 2, *, address: str | None = None, cpus_per_worker: float | None = None,
                 gpus_per_worker: float = 0.0, actor_restarts: int = 3, ready_timeout: float = 600.0):
        if workers < 1:
            raise LoraHubError(f"workers must be at least 1, got {workers}")
        if (cpus_per_worker is not None and cpus_per_worker <= 0) or gpus_per_worker < 0:
            raise LoraHubError(f"cpus per worker must be > 0 and GPUs per worker >= 0, got {cpus_per_worker} and "
                               f"{gpus_per_worker}")
        self.workers, self.address = workers, address
        self.cpus_per_worker, self.gpus_per_worker = cpus_per_worker, gpus_per_worker
        self.actor_restarts, self.ready_timeout = actor_restarts, ready_timeout
        self.placement: list[dict] = []  # where the last call's actors ran (pid, node)

    def describe(self) -> dict:
        """What the recipe records: ``{"backend": "ray", "workers": W, "actors": [{pid, node}, ...]}``."""
        return {"backend": "ray", "workers": self.workers, "actors": self.placement}

    def __call__(self, context: SelectionContext, tasks: Sequence[FoldTask]) -> Iterator[FoldResult]:
        if context.model is None:
            raise LoraHubError("RayFolds needs the context's model (SelectionContext(..., model=...)) to load it "
                               "on the actors")
        started = connect(self.address)
        actors = []
        try:
            workers = min(self.workers, len(tasks))
            cpus = self.cpus_per_worker or default_cpus_per_worker(workers)
            check_resources(workers, cpus, self.gpus_per_worker)
            device = context.device or ("cuda" if self.gpus_per_worker > 0 else "cpu")
            modules_ref = ray.put(list(context.composer.modules))
            remote = ray.remote(FoldWorker).options(
                num_cpus=cpus, num_gpus=self.gpus_per_worker, max_restarts=self.actor_restarts,
                max_task_retries=self.actor_restarts, runtime_env=runtime_env())
            actors = [remote.remote(context.model, modules_ref, context.composer.merge_method, context.spec(),
                                    device=device, threads=max(1, int(cpus))) for _ in range(workers)]
            wait_for_evaluators(actors, self.ready_timeout)
            self.placement = ray.get([a.ready.remote() for a in actors])
            yield from ActorPool(actors).map_unordered(lambda actor, task: actor.run_fold.remote(task), tasks)
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)
            if started:
                ray.shutdown()
