"""The recipe: everything needed to rebuild a composed model, saved as ``recipe.json``; and the layout of
the run directory around it (:func:`run_files`)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec

from lorahub_ray.errors import LoraHubError
from lorahub_ray.io import storage

RECIPE_FILE = "recipe.json"
MODEL_DIR = "model"  # the merged model, written only when asked (--merge, merge=True)
ADAPTER_DIR = "adapter"  # the composed module as a PEFT LoRA adapter (lorahub_ray.core.adapter)
HISTORY_FILE = "history.parquet"
FORMAT = "lorahub-ray/recipe/v1"


def versions() -> dict[str, str]:
    import nevergrad
    import peft
    import torch
    import transformers

    from lorahub_ray import __version__

    return {"lorahub_ray": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "nevergrad": nevergrad.__version__}


@dataclass
class Recipe:
    base_model: str
    base_model_sha256: str
    modules: list[dict]  # [{"name", "uri", "sha256"}], in the order of ``weights``
    weights: list[float]
    objective: float
    optimizer: str
    algorithm: str
    budget: int
    seed: int
    loss: str = "reference"
    batch_size: int | None = None
    regularizer: str = "l1(0.05)"
    merge_method: str = "linear"
    template: str = "plain"  # how inputs become prompts (lorahub_ray.core.families.TEMPLATES)
    adapter_sha256: str | None = None  # of the run's adapter/, checked when it is loaded (None: no adapter)
    num_examples: int = 0
    started: str = ""
    finished: str = ""
    search: dict = field(default_factory=dict)  # how the search ran (e.g. on Ray: workers, restarts, trials)
    versions: dict = field(default_factory=versions)
    format: str = FORMAT

    def __post_init__(self):
        if len(self.modules) != len(self.weights):
            raise LoraHubError(f"recipe has {len(self.modules)} modules but {len(self.weights)} weights")

    @property
    def module_weights(self) -> dict[str, float]:
        return {m["name"]: w for m, w in zip(self.modules, self.weights)}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / RECIPE_FILE
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, uri: str | Path) -> "Recipe":
        """Read a recipe from ``recipe.json``, or from a directory holding one (local or ``s3://``)."""
        uri = str(uri)
        if not uri.endswith(".json"):
            uri = uri.rstrip("/") + "/" + RECIPE_FILE
        try:
            with fsspec.open(uri, "r") as fh:
                data = json.load(fh)
        except FileNotFoundError:
            raise LoraHubError(f"no recipe at '{uri}'") from None
        except json.JSONDecodeError as exc:
            raise LoraHubError(f"recipe '{uri}' is not valid JSON ({exc})") from None
        import dataclasses

        fields = dataclasses.fields(cls)
        known = {f.name for f in fields}
        required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise LoraHubError(f"recipe '{uri}' lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class RunFiles:
    """What a run directory (local or ``s3://``) holds besides its ``recipe.json``."""

    uri: str
    model: bool  # model/: the merged model (written with --merge)
    adapter: bool  # adapter/: the composed module as a PEFT adapter

    def path(self, name: str) -> str:
        return f"{self.uri.rstrip('/')}/{name}"


def run_files(uri: str | Path) -> RunFiles | None:
    """The layout of the run directory at ``uri``, or ``None`` when ``uri`` holds no ``recipe.json``
    (a model directory, a Hub id, a file). Only a listing: nothing is read or downloaded."""
    uri = str(uri)
    if not storage.is_remote(uri):
        local = Path(uri.removeprefix("file://")).expanduser()
        if not (local / RECIPE_FILE).is_file():
            return None
        return RunFiles(uri, (local / MODEL_DIR / "config.json").is_file(),
                        (local / ADAPTER_DIR / storage.ADAPTER_CONFIG).is_file())
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    if not fs.exists(f"{root}/{RECIPE_FILE}"):
        return None
    return RunFiles(uri, fs.exists(f"{root}/{MODEL_DIR}/config.json"),
                    fs.exists(f"{root}/{ADAPTER_DIR}/{storage.ADAPTER_CONFIG}"))
