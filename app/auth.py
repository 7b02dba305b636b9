"""``X-API-Key`` authentication and tenants.

Every key belongs to a tenant (``FPROTOSEG_API_KEYS=tenant:key,...``; a bare key is its own tenant),
and a tenant sees, downloads, cancels and idempotency-matches only its own jobs. Admin keys
(``FPROTOSEG_ADMIN_KEYS``) see every tenant. Keys are compared as sha256 digests, in constant time
against every configured digest, so the configuration may hold ``sha256:<hex>`` instead of the key.

No key configured and auth not disabled means *closed*, never open. ``fprotoseg serve`` makes the
one-command start usable by generating a key once (stored 0600 in the data dir, printed at start).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from fprotoseg.app.errors import Problem
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.jobstore import JobRecord
from fprotoseg.worker.service.settings import KeyEntry, Settings
from fprotoseg.worker.service.storage import load_or_create_secret

API_KEY_HEADER = "X-API-Key"
# auto_error=False: a missing key gets our problem body (and WWW-Authenticate), not FastAPI's 403.
api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    auto_error=False,
    scheme_name="APIKeyHeader",
    description="An API key from FPROTOSEG_API_KEYS (or the one `fprotoseg serve` generated).",
)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant whose jobs they see, or an admin who sees every tenant."""

    tenant: str
    admin: bool = False

    def may_see(self, rec: JobRecord) -> bool:
        return self.admin or rec.tenant == self.tenant

    @property
    def list_filter(self) -> str | None:
        """The tenant to list, or None (every tenant) for an admin."""
        return None if self.admin else self.tenant


ANONYMOUS = Principal(tenant="", admin=True)  # FPROTOSEG_AUTH_DISABLED=true: one open service


def load_or_create_api_key(settings: Settings) -> tuple[str, bool]:
    """(key, created): the key stored in ``<data dir>/api-key``, generated there on first use."""
    return load_or_create_secret(settings.api_key_file)


def match_key(candidate: str, entries: list[KeyEntry]) -> KeyEntry | None:
    """The entry whose digest equals the candidate's; every entry is compared (no early exit), so
    timing reveals neither which key matched nor how many there are before it."""
    digest = hashlib.sha256(candidate.encode()).digest()
    found: KeyEntry | None = None
    for entry in entries:
        if hmac.compare_digest(digest, entry.key_sha256) and found is None:
            found = entry
    return found


def _unauthorized(detail: str) -> Problem:
    return Problem(
        ErrorCode.UNAUTHORIZED, detail, headers={"WWW-Authenticate": f'ApiKey header="{API_KEY_HEADER}"'}
    )


def authenticate(request: Request, x_api_key: str | None) -> Principal:
    settings: Settings = request.app.state.settings
    if settings.auth_disabled:
        return ANONYMOUS
    entries: list[KeyEntry] = request.app.state.key_entries
    if not entries:
        raise _unauthorized(
            "no API key is configured on this server: set FPROTOSEG_API_KEYS (or start it with "
            "`fprotoseg serve`, which generates one)"
        )
    entry = match_key(x_api_key, entries) if x_api_key else None
    if entry is None:
        raise _unauthorized("missing or wrong API key: send it in the X-API-Key header")
    return Principal(tenant=entry.tenant, admin=entry.admin)


def require_api_key(
    request: Request, x_api_key: Annotated[str | None, Security(api_key_scheme)] = None
) -> Principal:
    return authenticate(request, x_api_key)


ApiKey = Annotated[Principal, Depends(require_api_key)]
