"""GGUF model files as base models: converted once into a plain transformers directory, cached.

transformers reads a ``.gguf`` file with ``from_pretrained(dir, gguf_file=name)`` (needs the ``gguf``
package: ``pip install 'lorahub-ray[gguf]'``) and dequantises it to float32, which takes seconds to
minutes. The loaded model refuses ``save_pretrained`` because transformers leaves its GGUF quantizer
attached, although every weight is a plain tensor: the quantizer and ``config.quantization_config``
are detached before saving. The directory lands in the cache under the file's sha256
(``$LORAHUB_RAY_CACHE/gguf/<sha256>``) with a stamp naming the file and its hash; every later run,
actor or replica loads that directory in about a second, without ``gguf``. A recipe records the
file's sha256 as its ``base_model_sha256``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec

from lorahub_ray.core.families import family_of
from lorahub_ray.errors import LoraHubError
from lorahub_ray.io import storage

SUFFIX = ".gguf"
MAGIC = b"GGUF"
STAMP = ".lorahub-ray-gguf.json"


def is_gguf(uri) -> bool:
    return str(uri).lower().rstrip("/").endswith(SUFFIX)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def local_file(uri: str) -> Path:
    """The ``.gguf`` file at ``uri`` as a local path (an ``s3://`` one downloaded to the cache once,
    again only when its size changes), checked to start with the GGUF magic bytes."""
    uri = str(uri)
    if storage.is_remote(uri):
        fs, root = fsspec.core.url_to_fs(uri)
        try:
            size = fs.size(root)
        except Exception as exc:
            raise LoraHubError(f"base model '{uri}': cannot read it ({type(exc).__name__}: {exc})") from None
        path = storage.cache_root() / "gguf-files" / hashlib.sha256(uri.encode()).hexdigest()[:24] / Path(root).name
        if not path.is_file() or path.stat().st_size != size:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            fs.get_file(root, str(partial))
            partial.replace(path)
    else:
        path = Path(uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise LoraHubError(f"base model '{uri}': no such GGUF file")
    with open(path, "rb") as fh:
        if fh.read(4) != MAGIC:
            raise LoraHubError(f"base model '{uri}' is not a GGUF file (it does not start with the GGUF magic bytes)")
    return path


def recorded_sha256(directory: Path) -> str | None:
    """The GGUF file's sha256 if ``directory`` was converted from one, else None."""
    stamp = Path(directory) / STAMP
    if not stamp.is_file():
        return None
    try:
        return json.loads(stamp.read_text())["sha256"]
    except (ValueError, KeyError, OSError):
        return None


def converted_directory(uri: str) -> Path:
    """The cached transformers directory of the GGUF model at ``uri``, converting it the first time."""
    path = local_file(uri)
    digest = file_sha256(path)
    target = storage.cache_root() / "gguf" / digest[:32]
    if recorded_sha256(target) == digest:
        return target
    try:
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        model = family_of(config, what=f"GGUF file '{uri}'").load(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except LoraHubError:
        raise
    except ImportError as exc:
        raise LoraHubError(f"base model '{uri}': reading GGUF files needs the gguf package "
                           f"(pip install 'lorahub-ray[gguf]'): {exc}") from None
    except Exception as exc:  # transformers' errors for a GGUF file that holds no model it knows
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LoraHubError(f"base model '{uri}': not a GGUF model transformers can load ({first})") from None
    # the weights are plain tensors by now; the GGUF quantizer left attached blocks save_pretrained
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with storage.atomic_directory(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / STAMP).write_text(json.dumps({"source": str(uri), "file": path.name, "sha256": digest}) + "\n")
    return target
