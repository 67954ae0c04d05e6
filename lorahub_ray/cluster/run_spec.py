"""The typed specification of one Ray search run, and where its state lives.

:class:`RunSpec` is built once from the user's arguments (checked by the same
:class:`~lorahub_ray.core.settings.SearchSettings` as the local search, plus the Ray-only checks in
:func:`check_ray_options`) and written as ``lorahub-run.json`` into the run's storage directory
(default ``<output>.search``, beside the output; on S3 for an ``s3://`` output). Ray Tune keeps the
search itself beside it, as the experiment ``<storage>/search`` (:attr:`RunSpec.experiment`): its trials,
their reported results and checkpoints. ``--resume`` reads the spec back and restores that experiment.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec

from lorahub_ray.core.portfolio import RestartPlan
from lorahub_ray.cluster.tune_options import check_callbacks, check_scheduler, check_searcher
from lorahub_ray.core.search import check_optimizer
from lorahub_ray.core.settings import SearchSettings
from lorahub_ray.errors import LoraHubError
from lorahub_ray.io import storage

RUN_FILE = "lorahub-run.json"
STORAGE_SUFFIX = ".search"
EXPERIMENT = "search"  # the Tune experiment's name, under the storage directory


@dataclass
class RunSpec:
    model: str
    modules: list[dict]  # [{"name", "uri", "sha256"}] of the loaded hub, in index order
    inputs: list[str]
    outputs: list[str]
    output: str  # normalised: an absolute local path or an s3:// URI without a trailing slash
    storage: str  # where lorahub-run.json and the Tune experiment live
    settings: SearchSettings
    workers: int
    plans: list[RestartPlan]
    portfolio: list[str] | None = None
    modules_per_restart: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 0.0
    device: str | None = None
    scheduler: str = "fifo"
    searcher: str | None = None  # a Tune search algorithm: a candidate per trial instead of a restart per trial
    callbacks: list[str] = field(default_factory=list)  # Tune's tracking callbacks, by name
    max_failures: int = 2  # restarts of a failed trial, from its last checkpoint (Tune's FailureConfig)
    examples: str | None = None  # the few-shot file, when they came from one
    template: str = "plain"  # how inputs become prompts (lorahub_ray.core.families)
    resumed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def restarts(self) -> int:
        return len(self.plans)

    @property
    def experiment(self) -> str:
        """Where Tune keeps the search: a local path or an ``s3://`` URI."""
        return self.storage.rstrip("/") + "/" + EXPERIMENT

    def to_json(self) -> dict:
        data = asdict(self)
        data["settings"] = self.settings.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict, **custom) -> "RunSpec":
        data = dict(data)
        data["settings"] = SearchSettings.from_json(data["settings"], **custom)
        data["plans"] = [RestartPlan(**p) for p in data["plans"]]
        return cls(**data)

    def write(self) -> None:
        write_text(self.storage, RUN_FILE, json.dumps(self.to_json(), indent=2))


def check_ray_options(*, workers: int, restarts: int, modules_per_restart: int | None, scheduler,
                      cpus_per_worker: float | None, gpus_per_worker: float, portfolio, searcher=None,
                      callbacks=(), max_failures: int = 0) -> None:
    """The Ray search's own checks (the search's settings are :meth:`SearchSettings.check`'s)."""
    for name, value in (("workers", workers), ("restarts", restarts)):
        if value < 1:
            raise LoraHubError(f"{name} must be at least 1, got {value}")
    if modules_per_restart is not None and modules_per_restart < 1:
        raise LoraHubError(f"modules per restart must be at least 1, got {modules_per_restart}")
    if max_failures < 0:
        raise LoraHubError(f"max failures must not be negative, got {max_failures}")
    check_scheduler(scheduler)
    check_searcher(searcher)
    check_callbacks(callbacks)
    if searcher is not None and scheduler not in (None, "fifo"):
        raise LoraHubError("a searcher runs one candidate per trial: a scheduler of restarts does not apply to it")
    if cpus_per_worker is not None and cpus_per_worker <= 0:
        raise LoraHubError(f"cpus per worker must be positive, got {cpus_per_worker}")
    if gpus_per_worker < 0:
        raise LoraHubError(f"gpus per worker must not be negative, got {gpus_per_worker}")
    for name in portfolio or ():
        if not isinstance(name, str):
            raise LoraHubError(f"portfolio entries are nevergrad optimizer names, got {name!r}")
        check_optimizer(name)


def normalise_output(output) -> str:
    return str(output).rstrip("/") if storage.is_remote(str(output)) else str(Path(output).expanduser().resolve())


def storage_root(output: str, storage_path: str | None) -> str:
    """The run's storage: ``storage_path``, else ``<output>.search`` beside the output (on S3 for an
    ``s3://`` output, so that a driver elsewhere can resume it)."""
    if storage_path:
        return storage_path.rstrip("/") if storage.is_remote(storage_path) else str(Path(storage_path).expanduser().resolve())
    return output.rstrip("/") + STORAGE_SUFFIX


def read_spec(resume, **custom) -> RunSpec:
    """The run to resume: ``resume`` is its output (``<output>.search`` is looked in) or its storage."""
    resume = str(resume)
    local = not storage.is_remote(resume)
    root = str(Path(resume).expanduser().resolve()) if local else resume.rstrip("/")
    for candidate in (root, root + STORAGE_SUFFIX):
        text = read_text(candidate, RUN_FILE)
        if text is not None:
            spec = RunSpec.from_json(json.loads(text), **custom)
            spec.resumed += 1
            return spec
    raise LoraHubError(f"no search to resume at '{resume}': no {RUN_FILE} there or in '{root + STORAGE_SUFFIX}'")


def read_text(root: str, name: str) -> str | None:
    fs, path = fsspec.core.url_to_fs(root.rstrip("/") + "/" + name)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as fh:
        return fh.read()


def write_text(root: str, name: str, text: str) -> None:
    """Replace ``root/name`` in one step: a rename locally, one PUT on S3."""
    storage.write_text(root.rstrip("/") + "/" + name, text)
