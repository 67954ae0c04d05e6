"""A real S3 API on loopback: moto's server mode, started by the tests themselves."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from ports import free_port

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}




@contextlib.contextmanager
def moto_server():
    """Start moto's S3 server on 127.0.0.1, point the AWS env (boto3, s3fs) at it, yield its URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def s3fs_client():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})


def upload_dir(local: Path, uri: str) -> str:
    """Copy a local directory to ``s3://bucket/prefix`` file by file."""
    fs = s3fs_client()
    bucket = uri.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for path in sorted(Path(local).rglob("*")):
        if path.is_file():
            fs.put_file(str(path), f"{uri.rstrip('/')}/{path.relative_to(local).as_posix()}")
    return uri
