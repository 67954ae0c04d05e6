"""lorahub-ray: LoraHub (gradient-free composition of LoRA modules) at cluster scale on Ray.

The public names below are imported on first use (PEP 562), so that light modules such as
``lorahub_ray.io.examples`` or ``lorahub_ray.evaluation.evaluate`` (which Ray tasks import to read and check
data) do not pay for torch, transformers and nevergrad.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "api": ["LoraHubResult", "build_model", "evaluate", "load_model", "lorahub_learning", "lorahub_tasks"],
    "core.compose": ["MERGE_METHODS", "LoraComposer"],
    "io.examples": ["Examples", "read_examples"],
    "errors": ["DataError", "IncompatibleModulesError", "IntegrityError", "LoraHubError", "ModuleLoadError"],
    "core.modules": ["LoraModule", "check_compatible", "load_module", "load_modules"],
    "core.objective": ["FewShotObjective", "l1_regularization", "mean_loss", "reference_loss"],
    "core.recipe": ["Recipe"],
    "core.search": ["SearchResult", "minimize"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # a submodule as an attribute: lr.inference
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs
    from lorahub_ray.api import LoraHubResult, build_model, evaluate, load_model, lorahub_learning, lorahub_tasks  # noqa: F401
    from lorahub_ray.core.compose import MERGE_METHODS, LoraComposer  # noqa: F401
    from lorahub_ray.io.examples import Examples, read_examples  # noqa: F401
    from lorahub_ray.errors import DataError, IncompatibleModulesError, IntegrityError, LoraHubError, ModuleLoadError  # noqa: F401
    from lorahub_ray.core.modules import LoraModule, check_compatible, load_module, load_modules  # noqa: F401
    from lorahub_ray.core.objective import FewShotObjective, l1_regularization, mean_loss, reference_loss  # noqa: F401
    from lorahub_ray.core.recipe import Recipe  # noqa: F401
    from lorahub_ray.core.search import SearchResult, minimize  # noqa: F401
