"""lorahub-ray: LoraHub (gradient-free composition of LoRA modules) at cluster scale on Ray."""

__version__ = "0.1.0"

from .api import LoraHubResult, build_model, evaluate, load_model, lorahub_learning
from .compose import MERGE_METHODS, LoraComposer
from .data import Examples, read_examples
from .errors import DataError, IncompatibleModulesError, IntegrityError, LoraHubError, ModuleLoadError
from .modules import LoraModule, check_compatible, load_module, load_modules
from .objective import FewShotObjective, l1_regularization, mean_loss, reference_loss
from .recipe import Recipe
from .search import SearchResult, minimize

__all__ = [
    "DataError", "Examples", "FewShotObjective", "IncompatibleModulesError", "IntegrityError", "LoraComposer",
    "LoraHubError", "LoraHubResult", "LoraModule", "MERGE_METHODS", "Recipe", "SearchResult", "build_model",
    "check_compatible", "evaluate", "l1_regularization", "load_model", "load_module", "load_modules",
    "lorahub_learning", "mean_loss", "minimize", "read_examples", "reference_loss",
]
