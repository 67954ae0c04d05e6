"""Errors raised on bad input. Each names its culprit (module, file, row, field)."""


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
