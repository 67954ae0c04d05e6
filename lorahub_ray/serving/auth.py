"""API-key authentication for the HTTP endpoint (Ray-free): ``Authorization: Bearer KEY`` on every route
but the public ones (``/healthz``), as vLLM's ``--api-key``.

Only the key's SHA-256 digest is kept, and a request's key is compared by digest with
``hmac.compare_digest`` (constant time, and equal lengths whatever the key sent). A missing or wrong
key gets a 401 in OpenAI's error JSON that never echoes what was sent.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable

ENV_VAR = "LORAHUB_RAY_API_KEY"
PUBLIC_PATHS = ("/healthz",)


class AuthConfigError(ValueError):
    """An API key that cannot be used (empty, or named by an unset environment variable)."""


def key_digest(key: str) -> bytes:
    """The SHA-256 digest that stands for ``key`` (the key itself is not kept)."""
    if not key or not key.strip():
        raise AuthConfigError("the API key is empty")
    return hashlib.sha256(key.encode("utf-8")).digest()


def digest_from_env(name: str) -> bytes:
    """The digest of the key held by the environment variable ``name`` in this process."""
    value = os.environ.get(name)
    if not value:
        raise AuthConfigError(f"api_key_env: the environment variable ${name} is not set (or empty) where the "
                              "ingress runs; set it on every Ray node (e.g. from a Kubernetes Secret)")
    return key_digest(value)


def authorized(header: str | None, expected: bytes) -> bool:
    """Whether an ``Authorization`` header carries the key whose digest is ``expected``."""
    scheme, _, token = (header or "").partition(" ")
    given = hashlib.sha256(token.strip().encode("utf-8")).digest()
    # compare even when the scheme is wrong, so that the time taken says nothing about the header
    return hmac.compare_digest(given, expected) and scheme.lower() == "bearer"


def unauthorized_body(missing: bool) -> dict:
    message = ("missing API key: send the header 'Authorization: Bearer KEY'" if missing
               else "incorrect API key provided")
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}


class BearerAuth:
    """ASGI middleware: a 401 for any HTTP request outside :data:`PUBLIC_PATHS` whose bearer key is
    missing or wrong, while ``digest()`` gives a digest (None: no key, every route open). Paths are
    taken relative to the application's route prefix (``root_path``)."""

    def __init__(self, app, digest: Callable[[], bytes | None], public: tuple[str, ...] = PUBLIC_PATHS):
        self.app, self.digest, self.public = app, digest, public

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            expected = self.digest()
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root):] or "/"
            if expected is not None and path not in self.public:
                header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
                if not authorized(header, expected):
                    await _send_json(send, 401, unauthorized_body(header is None),
                                     [(b"www-authenticate", b'Bearer realm="lorahub-ray"')])
                    return
        await self.app(scope, receive, send)


async def _send_json(send, status: int, body: dict, headers: list) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})
