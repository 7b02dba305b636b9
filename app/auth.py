"""``X-API-Key`` authentication: constant-time comparison against FPROTOSEG_API_KEYS.

No key configured and auth not disabled means *closed*, never open. ``fprotoseg serve`` makes the
one-command start usable by generating a key once (stored 0600 in the data dir, printed at start).
"""

from __future__ import annotations

import hmac
import os
import secrets
from typing import Annotated

from fastapi import Depends, Header, Request

from fprotoseg.app.errors import Problem
from fprotoseg.worker.service.settings import Settings


def load_or_create_api_key(settings: Settings) -> tuple[str, bool]:
    """(key, created): the key stored in ``<data dir>/api-key``, generated there on first use."""
    path = settings.api_key_file
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key, False
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    os.chmod(path, 0o600)
    return key, True


def key_matches(candidate: str, keys: list[str]) -> bool:
    """Compare against every key without an early exit, so timing reveals nothing."""
    ok = False
    raw = candidate.encode()
    for key in keys:
        ok |= hmac.compare_digest(raw, key.encode())
    return ok


def require_api_key(
    request: Request, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None
) -> None:
    settings: Settings = request.app.state.settings
    if settings.auth_disabled:
        return
    if not settings.api_keys:
        raise Problem(
            401,
            "no API key is configured on this server: set FPROTOSEG_API_KEYS (or start it with "
            "`fprotoseg serve`, which generates one)",
            code="unauthorized",
            headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'},
        )
    if not x_api_key or not key_matches(x_api_key, settings.api_keys):
        raise Problem(
            401,
            "missing or wrong API key: send it in the X-API-Key header",
            code="unauthorized",
            headers={"WWW-Authenticate": 'ApiKey header="X-API-Key"'},
        )


ApiKey = Annotated[None, Depends(require_api_key)]
