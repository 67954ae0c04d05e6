"""The few-shot objective on Ray actors that hold the model: the evaluators of the Ray search.

:class:`Evaluator` is the actor class: it loads the base model once, stacks the K modules once and
tokenises the examples once, then answers evaluation calls for the whole run (the candidates of one
call share forward passes). :class:`Evaluators` starts W of them as *named* actors, so that the light
Tune trials of a search (:mod:`lorahub_ray.cluster.tune`) find them by name, checks first that they
fit the cluster, waits for them, and ends them. An actor is created with ``max_restarts`` and
``max_task_retries``: one that dies is restarted by Ray and its calls retried.

The actor class stays light to import (no nevergrad, no Tune): it is what an evaluator's process loads.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence

import ray

from lorahub_ray.errors import LoraHubError

NAME_PREFIX = "lorahub-evaluator"


class ResourceError(LoraHubError):
    """The evaluator actors (and the trials beside them) ask for more than the Ray cluster has."""


class SearchFailed(RuntimeError):
    """The search failed (an evaluator that cannot start or keeps dying, or the optimizer); carries its error."""


class Evaluator:
    """Holds the base model with the K modules stacked in one LoRA slot and the tokenised examples.

    ``evaluate_subsets(candidates, subsets)`` returns each candidate's objective, the candidates sharing
    forward passes; a candidate holds the weights of the modules at its subset (the others get weight 0,
    which is the composition of the subset alone).
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
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id()}

    def losses(self, candidates: Sequence[Sequence[float]], indices: Sequence[int] | None = None) -> list[float]:
        """The losses without the regulariser (see :meth:`FewShotObjective.losses`): preselection's scores."""
        return list(self.objective.losses(candidates, indices))

    def evaluate_subsets(self, candidates: Sequence[Sequence[float]], subsets: Sequence[Sequence[int]]) -> list[float]:
        """Each candidate with its own modules (see :meth:`FewShotObjective.evaluate_subsets`)."""
        return self.objective.evaluate_subsets(candidates, subsets)


def check_resources(workers: int, cpus: float, gpus: float, *, reserved_cpus: float = 0.0) -> None:
    """Fail before starting anything when ``workers`` actors of ``cpus``/``gpus`` each, plus
    ``reserved_cpus`` for the work beside them (Tune's trials), cannot fit the cluster."""
    total = ray.cluster_resources()
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    have_cpu, have_gpu = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if gpus > 0 and not any(n.get("GPU", 0.0) >= gpus for n in nodes):
        raise ResourceError(f"each evaluator asks for {gpus:g} GPU but no node of the cluster has that many "
                            f"(cluster GPUs: {have_gpu:g}); lower --gpus-per-worker or add GPU nodes")
    if gpus * workers > have_gpu + 1e-9:
        raise ResourceError(f"{workers} evaluators × {gpus:g} GPU = {gpus * workers:g} GPUs but the cluster has "
                            f"{have_gpu:g}; lower --workers or --gpus-per-worker (fractions such as 0.25 share a GPU)")
    if not any(n.get("CPU", 0.0) >= cpus for n in nodes):
        raise ResourceError(f"each evaluator asks for {cpus:g} CPUs but no node of the cluster has that many")
    need = cpus * workers + reserved_cpus
    if need > have_cpu + 1e-9:
        beside = f" + {reserved_cpus:g} for the trials" if reserved_cpus else ""
        raise ResourceError(f"{workers} evaluators × {cpus:g} CPUs{beside} = {need:g} CPUs but the cluster has "
                            f"{have_cpu:g}; lower --workers or --cpus-per-worker")


def wait_for_evaluators(actors: list, timeout: float) -> None:
    """Wait until every evaluator has started, or fail once with the cause."""
    try:
        ray.get([a.ready.remote() for a in actors], timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ResourceError(f"the {len(actors)} evaluators did not start within {timeout:g} s; the cluster may "
                            "lack the resources they ask for") from None
    except ray.exceptions.RayActorError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise SearchFailed(f"an evaluator failed to start: {root_message(cause)}") from None


def root_message(exc: BaseException) -> str:
    """The last line of an error's cause: what a user needs of a remote traceback."""
    cause = getattr(exc, "cause", None)
    text = str(cause if cause is not None else exc).strip().splitlines()
    return text[-1] if text else repr(exc)


class Evaluators:
    """``workers`` named :class:`Evaluator` actors over one base model and one list of modules.

    The modules go to the object store once; this object holds that reference for as long as it lives, so
    that an actor Ray restarts reads them again. Use it as a context manager, or call :meth:`close`.
    ``names`` are what Tune trials look the actors up by (``ray.get_actor``); they are unique per pool.
    """

    def __init__(self, model: str, modules: Sequence, inputs: Sequence[str] | None = None,
                 outputs: Sequence[str] | None = None, *, workers: int, cpus: float, gpus: float = 0.0,
                 device: str | None = None, loss="reference", batch_size: int | None = None,
                 regularizer: Callable | None = None, template: str = "plain", actor_restarts: int = 3):
        from lorahub_ray.core.objective import l1_regularization

        self.run_id = uuid.uuid4().hex[:8]
        self.names = [f"{NAME_PREFIX}-{self.run_id}-{i}" for i in range(workers)]
        self.modules_ref = ray.put(list(modules))
        device = device or ("cuda" if gpus > 0 else "cpu")
        options = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=actor_restarts, max_task_retries=actor_restarts)
        remote = ray.remote(Evaluator)
        self.actors = [remote.options(name=name, **options).remote(
            str(model), self.modules_ref, None if inputs is None else list(inputs),
            None if outputs is None else list(outputs), loss=loss, batch_size=batch_size,
            regularizer=regularizer or l1_regularization, device=device, threads=max(1, int(cpus)),
            template=template) for name in self.names]

    def wait(self, timeout: float = 600.0) -> "Evaluators":
        wait_for_evaluators(self.actors, timeout)
        return self

    def set_examples(self, inputs: Sequence[str], outputs: Sequence[str]) -> None:
        ray.get([a.set_examples.remote(list(inputs), list(outputs)) for a in self.actors])

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []

    def __enter__(self) -> "Evaluators":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
