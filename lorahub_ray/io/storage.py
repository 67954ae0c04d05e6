"""Where things live: local paths, fsspec URIs (``s3://...``) and Hugging Face Hub ids.

Remote directories are copied once into a local cache (``$LORAHUB_RAY_CACHE`` or
``~/.cache/lorahub-ray``) and reused while their listing (names, sizes, ETags) is unchanged.
Outputs are written atomically: a crash leaves the old output or none, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec

from lorahub_ray.errors import LoraHubError

ADAPTER_CONFIG = "adapter_config.json"


def cache_root() -> Path:
    return Path(os.environ.get("LORAHUB_RAY_CACHE", Path.home() / ".cache" / "lorahub-ray")).expanduser()


def is_remote(uri: str) -> bool:
    """True for fsspec URLs such as ``s3://bucket/key`` (``file://`` counts as local)."""
    return "://" in str(uri) and not str(uri).startswith("file://")


def _local_path(uri: str) -> Path:
    return Path(str(uri).removeprefix("file://")).expanduser()


def _looks_like_hub_id(uri: str) -> bool:
    parts = uri.split("/")
    return (
        0 < len(parts) <= 2
        and all(parts)
        and not uri.startswith((".", "~", "/"))
        and not uri.endswith((".json", ".jsonl", ".parquet", ".csv"))
    )


def resolve(uri: str, *, what: str = "path") -> Path:
    """Return a local directory holding the files at ``uri``.

    ``uri`` is a local directory, an fsspec URL (``s3://bucket/prefix``) copied to the cache,
    or a Hugging Face Hub id (``google/flan-t5-large``) fetched with ``snapshot_download``.
    ``what`` names the thing in error messages ("base model", "module 'x'").
    """
    uri = str(uri)
    if is_remote(uri):
        return _download_dir(uri, what=what)
    path = _local_path(uri)
    if path.exists():
        if not path.is_dir():
            raise LoraHubError(f"{what} '{uri}' is a file, expected a directory")
        return path
    if _looks_like_hub_id(uri):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(uri))
        except Exception as exc:  # offline, unknown repo, auth: all the same to the user
            raise LoraHubError(
                f"{what} '{uri}' is not a local directory and could not be fetched from the "
                f"Hugging Face Hub ({type(exc).__name__}: {exc})"
            ) from None
    raise LoraHubError(f"{what} '{uri}' does not exist")


def _remote_listing(fs, root: str, uri: str, what: str) -> dict[str, dict]:
    try:
        found = fs.find(root, detail=True)
    except Exception as exc:
        raise LoraHubError(f"{what} '{uri}' could not be listed ({type(exc).__name__}: {exc})") from None
    files = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        rel = path[len(root) :].lstrip("/")
        files[rel or Path(path).name] = {
            "size": info.get("size"),
            "etag": str(info.get("ETag") or info.get("etag") or info.get("mtime") or ""),
        }
    if not files:
        raise LoraHubError(f"{what} '{uri}' does not exist or is empty")
    return files


def _download_dir(uri: str, *, what: str) -> Path:
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    listing = _remote_listing(fs, root, uri, what)
    fingerprint = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()
    target = cache_root() / "remote" / hashlib.sha256(uri.encode()).hexdigest()[:24]
    stamp = target / ".lorahub-ray-source.json"
    if stamp.exists():
        with contextlib.suppress(ValueError, OSError):
            if json.loads(stamp.read_text()).get("fingerprint") == fingerprint:
                return target
    with atomic_directory(target, overwrite=True) as tmp:
        for rel in sorted(listing):
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{root}/{rel}", str(dest))
        (tmp / stamp.name).write_text(json.dumps({"uri": uri, "fingerprint": fingerprint}))
    return target


def list_adapter_uris(uri: str) -> list[str]:
    """Expand ``uri`` into adapter directories: itself if it holds ``adapter_config.json``,
    else its immediate subdirectories that do (sorted). Hub ids are returned as they are."""
    uri = str(uri)
    if is_remote(uri):
        fs, root = fsspec.core.url_to_fs(uri)
        root = root.rstrip("/")
        if fs.exists(f"{root}/{ADAPTER_CONFIG}"):
            return [uri]
        protocol = uri.split("://", 1)[0]
        try:
            children = fs.ls(root, detail=False)
        except FileNotFoundError:
            children = []
        found = sorted(p.rstrip("/") for p in children if fs.exists(f"{p.rstrip('/')}/{ADAPTER_CONFIG}"))
        if not found:
            raise LoraHubError(f"no LoRA module (no {ADAPTER_CONFIG}) at or under '{uri}'")
        return [f"{protocol}://{p}" for p in found]
    path = _local_path(uri)
    if not path.exists():
        if _looks_like_hub_id(uri):
            return [uri]
        raise LoraHubError(f"module path '{uri}' does not exist")
    if (path / ADAPTER_CONFIG).exists():
        return [uri]
    found = sorted(str(p) for p in path.iterdir() if (p / ADAPTER_CONFIG).is_file())
    if not found:
        raise LoraHubError(f"no LoRA module (no {ADAPTER_CONFIG}) at or under '{uri}'")
    return found


def sha256_dir(path: Path, *, skip: tuple[str, ...] = (".lorahub-ray-source.json",)) -> str:
    """Content hash of a directory: relative names and bytes of every file, in sorted order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name not in skip):
        rel = file.relative_to(path).as_posix()
        if rel.startswith(".cache/"):  # huggingface_hub's own bookkeeping
            continue
        digest.update(rel.encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_directory(target: str | Path, *, overwrite: bool = False, marker: str | None = None) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` in one rename.

    An existing non-empty ``target`` is replaced only when ``overwrite`` is true or when it
    holds ``marker`` (a file that shows it is an earlier output of ours); anything else is
    refused, so a user's unrelated files are never deleted.
    """
    target = Path(target).expanduser()
    if target.exists() and not target.is_dir():
        raise LoraHubError(f"output '{target}' exists and is not a directory")
    if not overwrite:
        check_output(str(target), marker=marker or "marker file")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_output(uri: str | Path, *, marker: str) -> None:
    """Refuse, before any work, an output that holds files but no ``marker`` (local or remote)."""
    uri = str(uri)
    if not is_remote(uri):
        path = _local_path(uri)
        if path.exists() and not path.is_dir():
            raise LoraHubError(f"output '{uri}' exists and is not a directory")
        if path.exists() and any(path.iterdir()) and not (path / marker).exists():
            raise LoraHubError(f"output directory '{uri}' is not empty and holds no {marker}: refusing to overwrite it")
        return
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    try:
        existing = fs.find(root)
    except FileNotFoundError:
        existing = []
    except Exception as exc:
        raise LoraHubError(f"output '{uri}' cannot be listed ({type(exc).__name__}: {exc})") from None
    bucket = root.split("/", 1)[0]
    if not existing and not fs.exists(bucket):
        raise LoraHubError(f"output '{uri}': bucket '{bucket}' does not exist or is not accessible")
    if existing and not fs.exists(f"{root}/{marker}"):
        raise LoraHubError(f"output '{uri}' is not empty and holds no {marker}: refusing to overwrite it")


@contextlib.contextmanager
def output_directory(uri: str | Path, *, marker: str) -> Iterator[Path]:
    """Yield a local directory to write an output into; on success it becomes ``uri``.

    Local ``uri``: :func:`atomic_directory` (one rename). Remote ``uri`` (``s3://...``): the files
    are written to a local temporary directory, then uploaded with ``marker`` last, so a reader
    that sees ``marker`` sees a complete output. An earlier output at ``uri`` (one holding
    ``marker``) has its marker removed first and its stale files removed after the upload;
    a prefix holding other files is refused. A failure before the upload leaves ``uri`` untouched.
    """
    if not is_remote(str(uri)):
        with atomic_directory(uri, marker=marker) as tmp:
            yield tmp
        return
    import tempfile

    check_output(uri, marker=marker)
    with tempfile.TemporaryDirectory(prefix="lorahub-ray-out-") as tmp:
        yield Path(tmp)
        upload_directory(Path(tmp), str(uri), marker=marker)


def upload_directory(local: Path, uri: str, *, marker: str) -> None:
    """Copy ``local`` to the remote prefix ``uri``, ``marker`` last (see :func:`output_directory`)."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    if marker not in files:
        raise LoraHubError(f"output for '{uri}' has no {marker}; nothing uploaded")
    try:
        old = {p[len(root):].lstrip("/") for p in fs.find(root)}
    except FileNotFoundError:
        old = set()
    try:
        if marker in old:
            fs.rm_file(f"{root}/{marker}")  # the old output stops being complete before it changes
        for rel in files:
            if rel != marker:
                fs.put_file(str(local / rel), f"{root}/{rel}")
        stale = sorted(old - set(files))
        if stale:
            fs.rm([f"{root}/{rel}" for rel in stale])
        fs.put_file(str(local / marker), f"{root}/{marker}")
    except Exception as exc:
        raise LoraHubError(f"upload to '{uri}' failed ({type(exc).__name__}: {exc}); it holds no {marker}") from exc
    fs.invalidate_cache(root)


def write_text(uri: str | Path, text: str) -> None:
    """Replace the file at ``uri`` in one step, so a reader sees the old text or the new, never half:
    a rename of a temporary sibling locally, one object put on S3. Parent folders are created."""
    if is_remote(str(uri)):
        fs, path = fsspec.core.url_to_fs(str(uri))
        fs.pipe_file(path, text.encode())
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json(uri: str | Path, data) -> None:
    """``data`` as indented JSON at ``uri``, replaced in one step (:func:`write_text`)."""
    write_text(uri, json.dumps(data, indent=2) + "\n")


def arrow_filesystem(uri: str):
    """``(pyarrow filesystem, path)`` for Ray's libraries (Ray Data's readers, Tune's storage):
    ``None`` and the absolute path for local files, else a pyarrow filesystem over fsspec (s3fs for
    ``s3://``) and the path without scheme. S3 settings come from this process's environment and
    travel with the filesystem object to other processes."""
    if not is_remote(uri):
        return None, os.path.abspath(os.path.expanduser(str(uri).removeprefix("file://")))
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    protocol, path = str(uri).split("://", 1)
    options = {}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        if os.environ.get("AWS_ACCESS_KEY_ID"):
            options["key"] = os.environ["AWS_ACCESS_KEY_ID"]
            options["secret"] = os.environ.get("AWS_SECRET_ACCESS_KEY")
            if os.environ.get("AWS_SESSION_TOKEN"):
                options["token"] = os.environ["AWS_SESSION_TOKEN"]
        protocol = "s3"
    return PyFileSystem(FSSpecHandler(fsspec.filesystem(protocol, **options))), path
