"""The settings of one coefficient search, checked in one place for the local and the Ray search.

:class:`SearchSettings` holds what decides the search itself (budget, optimizer, seed, loss,
batch size, regulariser, asks per step); :meth:`SearchSettings.check` is the one validation both
:func:`lorahub_ray.core.learning.lorahub_learning` and the Ray search
(:mod:`lorahub_ray.cluster.ray_search`) run before any expensive work, and the ``*_label``
properties are what the recipe records.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lorahub_ray.core.objective import LOSSES, LossFn, l1_regularization
from lorahub_ray.core.search import DEFAULT_BUDGET, DEFAULT_OPTIMIZER, check_optimizer, optimizer_label
from lorahub_ray.errors import LoraHubError, LoraHubWarning

CUSTOM = "<custom>"  # what a run file records for a Python object (a custom optimizer, loss or regulariser)


def name_of(value) -> str:
    return value if isinstance(value, str) else getattr(value, "__name__", "custom")


@dataclass
class SearchSettings:
    budget: int = DEFAULT_BUDGET
    optimizer: object = DEFAULT_OPTIMIZER  # a nevergrad registry name or optimizer class
    seed: int = 42
    loss: str | LossFn = "reference"
    batch_size: int | None = None
    regularizer: Callable[[Sequence[float]], float] = l1_regularization
    asks: int = 1  # candidates asked at once per search step (nevergrad's num_workers)

    def check(self, *, warn: bool = True) -> "SearchSettings":
        """Raise a :class:`LoraHubError` naming the first bad setting; warn when ``asks > 1``."""
        check_optimizer(self.optimizer)
        for name, value in (("budget", self.budget), ("asks", self.asks)):
            if not isinstance(value, int) or value < 1:
                raise LoraHubError(f"{name} must be at least 1, got {value}")
        if self.batch_size is not None and self.batch_size < 1:
            raise LoraHubError(f"batch size must be at least 1, got {self.batch_size}")
        if isinstance(self.loss, str) and self.loss not in LOSSES:
            raise LoraHubError(f"unknown loss {self.loss!r}; choose from {sorted(LOSSES)}")
        if not isinstance(self.loss, str) and not callable(self.loss):
            raise LoraHubError(f"loss must be a name or a callable, got {self.loss!r}")
        if warn and self.asks > 1:
            warnings.warn(f"asks={self.asks}: {self.asks} candidates asked at once trade quality for time (NGOpt "
                          "then picks another algorithm, which at a budget of tens of evaluations reaches a worse "
                          "optimum); on Ray, the default (one ask, a portfolio of restarts) uses the workers "
                          "without that cost", LoraHubWarning, stacklevel=3)
        return self

    @property
    def optimizer_label(self) -> str:
        return optimizer_label(self.optimizer)

    @property
    def loss_label(self) -> str:
        return name_of(self.loss)

    @property
    def regularizer_label(self) -> str:
        return "l1(0.05)" if self.regularizer is l1_regularization else name_of(self.regularizer)

    def to_json(self) -> dict:
        """The settings for a run file (Python objects as ``"<custom>"``; see :meth:`from_json`)."""
        return {"budget": self.budget, "optimizer": self.optimizer if isinstance(self.optimizer, str) else CUSTOM,
                "optimizer_label": self.optimizer_label, "seed": self.seed,
                "loss": self.loss if isinstance(self.loss, str) else CUSTOM, "loss_label": self.loss_label,
                "batch_size": self.batch_size,
                "regularizer": "l1(0.05)" if self.regularizer is l1_regularization else CUSTOM, "asks": self.asks}

    @classmethod
    def from_json(cls, data: dict, *, optimizer=None, loss=None, regularizer=None) -> "SearchSettings":
        """Settings read back from a run file; a ``"<custom>"`` entry needs its Python object again."""
        custom = {"optimizer": optimizer, "loss": loss, "regularizer": regularizer}
        for key, given in custom.items():
            if data[key] == CUSTOM and given is None:
                raise LoraHubError(f"this run used a custom {key} (a Python object): pass it again through the "
                                   "Python API to resume it")
        return cls(budget=data["budget"], optimizer=optimizer if data["optimizer"] == CUSTOM else data["optimizer"],
                   seed=data["seed"], loss=loss if data["loss"] == CUSTOM else data["loss"],
                   batch_size=data["batch_size"],
                   regularizer=regularizer if data["regularizer"] == CUSTOM else l1_regularization,
                   asks=data["asks"])
