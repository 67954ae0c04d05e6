"""LoRA modules: loading PEFT adapter directories and checking that they fit together.

A module is a PEFT adapter directory (``adapter_config.json`` plus ``adapter_model.safetensors``,
or ``adapter_model.bin`` read with ``torch.load(weights_only=True)``, never plain pickle).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorahub_ray.io import storage
from lorahub_ray.errors import IncompatibleModulesError, ModuleLoadError

SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

# adapter_config.json fields that must agree across modules for the sum of A's and B's to mean anything
MATCHING_FIELDS = (
    "base_model_name_or_path",
    "target_modules",
    "r",
    "lora_alpha",
    "use_rslora",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
)


@dataclass(frozen=True)
class LoraModule:
    name: str
    uri: str
    path: Path
    config: dict
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    sha256: str

    def __getstate__(self) -> dict:
        """What pickling (Ray's object store, multiprocessing) writes: each tensor with a storage of its own.
        Once a :class:`~lorahub_ray.core.compose.LoraComposer` has stacked the modules, their tensors are views
        of one ``[K, n]`` stack, and torch pickles a view's whole storage, once per tensor: for 20 Flan-T5-base
        modules that is the 141 MB stack times 2,880 tensors, and the driver ran out of memory (measured)."""
        own = {k: v if v.untyped_storage().nbytes() == v.numel() * v.element_size() else v.clone()
               for k, v in self.state_dict.items()}
        return {**self.__dict__, "state_dict": own}

    def field(self, key: str):
        value = self.config.get(key)
        if key == "target_modules" and isinstance(value, list):
            return sorted(value)
        if key in ("rank_pattern", "alpha_pattern") and not value:
            return {}
        return value


def module_name(uri: str) -> str:
    return str(uri).rstrip("/").split("/")[-1]


def _read_config(name: str, path: Path) -> dict:
    config_file = path / storage.ADAPTER_CONFIG
    if not config_file.is_file():
        raise ModuleLoadError(f"module '{name}': no {storage.ADAPTER_CONFIG} in '{path}'")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModuleLoadError(f"module '{name}': {config_file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModuleLoadError(f"module '{name}': {config_file} must hold a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ModuleLoadError(f"module '{name}' has peft_type={peft_type!r}; only 'LORA' modules can be composed")
    if config.get("use_dora"):
        raise ModuleLoadError(f"module '{name}' is a DoRA adapter (use_dora=true); only plain LoRA can be composed")
    if config.get("bias", "none") != "none":
        raise ModuleLoadError(f"module '{name}' trains biases (bias={config['bias']!r}); only bias='none' can be composed")
    if config.get("modules_to_save"):
        raise ModuleLoadError(f"module '{name}' saves full modules {config['modules_to_save']}; these cannot be composed")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        raise ModuleLoadError(f"module '{name}': {config_file} has invalid r={config.get('r')!r}")
    return config


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    if (path / SAFETENSORS_FILE).is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path / SAFETENSORS_FILE), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModuleLoadError(f"module '{name}': cannot read {path / SAFETENSORS_FILE} ({exc})") from None
    if (path / BIN_FILE).is_file():
        try:
            state = torch.load(path / BIN_FILE, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for anything but plain tensors
            raise ModuleLoadError(
                f"module '{name}': {path / BIN_FILE} is not a plain tensor file (loaded with weights_only=True): {exc}"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModuleLoadError(f"module '{name}': {path / BIN_FILE} does not hold a dict of tensors")
        return state
    raise ModuleLoadError(f"module '{name}': neither {SAFETENSORS_FILE} nor {BIN_FILE} in '{path}'")


def load_module(uri: str, name: str | None = None, *, expected_sha256: str | None = None) -> LoraModule:
    """Load one PEFT LoRA adapter from a local directory, an ``s3://`` prefix or a Hub id."""
    name = name or module_name(uri)
    path = storage.resolve(uri, what=f"module '{name}'")
    config = _read_config(name, path)
    digest = storage.sha256_dir(path)
    if expected_sha256 is not None and digest != expected_sha256:
        from lorahub_ray.errors import IntegrityError

        raise IntegrityError(
            f"module '{name}' at '{uri}' has changed: sha256 {digest[:12]}… but {expected_sha256[:12]}… was recorded"
        )
    state = _read_weights(name, path)
    if not state:
        raise ModuleLoadError(f"module '{name}': its weights file holds no tensors")
    return LoraModule(name=name, uri=str(uri), path=path, config=config, state_dict=state, sha256=digest)


def check_compatible(modules: list[LoraModule]) -> None:
    """Raise :class:`IncompatibleModulesError` naming the first module and field that differ."""
    if not modules:
        raise IncompatibleModulesError("no LoRA modules given")
    names = [m.name for m in modules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise IncompatibleModulesError(f"module names must be unique; repeated: {', '.join(duplicates)}")
    first = modules[0]
    for module in modules[1:]:
        for key in MATCHING_FIELDS:
            mine, theirs = module.field(key), first.field(key)
            if mine != theirs:
                raise IncompatibleModulesError(
                    f"module '{module.name}' has {key}={_show(mine)} but '{first.name}' has {key}={_show(theirs)}"
                )
        keys, first_keys = set(module.state_dict), set(first.state_dict)
        if keys != first_keys:
            extra = sorted(keys - first_keys)
            missing = sorted(first_keys - keys)
            detail = f"has extra tensor '{extra[0]}'" if extra else f"lacks tensor '{missing[0]}'"
            raise IncompatibleModulesError(f"module '{module.name}' {detail} that '{first.name}' does not")
        for key in sorted(first_keys):
            a, b = module.state_dict[key], first.state_dict[key]
            if a.shape != b.shape:
                raise IncompatibleModulesError(
                    f"module '{module.name}' has {key} of shape {tuple(a.shape)} but '{first.name}' has {tuple(b.shape)}"
                )


def _show(value) -> str:
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)


def load_modules(uris: list[str], *, progress=None) -> list[LoraModule]:
    """Expand folders into adapter directories, load every module and check they fit together."""
    expanded = [u for uri in uris for u in storage.list_adapter_uris(uri)]
    modules = []
    for uri in expanded:
        modules.append(load_module(uri))
        if progress is not None:
            progress(modules[-1])
    check_compatible(modules)
    return modules
