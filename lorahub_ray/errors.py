"""Errors raised on bad input. Each names its culprit (module, file, row, field)."""

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean a, b?"`` with the choices closest to ``name`` (up to 3), or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


class LoraHubError(ValueError):
    """Base class of the errors lorahub-ray raises for bad input."""


class ModuleLoadError(LoraHubError):
    """A LoRA module could not be read (missing files, bad JSON, unsupported format)."""


class IncompatibleModulesError(LoraHubError):
    """LoRA modules that cannot be composed together or with the base model."""


class DataError(LoraHubError):
    """A malformed data file (missing field, non-string value, empty file)."""


class IntegrityError(LoraHubError):
    """A file's content hash differs from the one recorded."""


class LoraHubWarning(UserWarning):
    """A run that works but probably not as meant (e.g. restarts that would repeat one search)."""
