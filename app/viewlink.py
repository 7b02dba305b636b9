"""Short-lived signed links to the result viewer, so a LIMS can open ``/jobs/{id}/view`` in a browser.

Why: a browser following a link cannot send the ``X-API-Key`` header. ``GET /jobs/{id}`` (with the
key) hands out ``links.view``: the page URL with ``?token=<expiry s>.<HMAC-SHA256>``. The MAC binds
the job id, the tenant that owns it and the expiry, under a per-install secret
(``FPROTOSEG_VIEW_LINK_SECRET`` or ``<data dir>/view-link-secret``), so a token opens that one job's
page and its tiles until it expires (``FPROTOSEG_VIEW_LINK_TTL_S``) and nothing else: never another
job, never the API.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from fprotoseg.worker.service.jobstore import JobRecord
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import SUCCEEDED
from fprotoseg.worker.service.storage import load_or_create_secret
from fprotoseg.worker.wsi.result_files import VIEWER_MANIFEST

MAX_TOKEN_CHARS = 128


def _secret(settings: Settings) -> bytes:
    if settings.view_link_secret:
        return settings.view_link_secret.encode()
    return load_or_create_secret(settings.view_link_secret_file)[0].encode()


def _mac(settings: Settings, job_id: str, tenant: str, expires_at_s: int) -> str:
    message = f"fprotoseg-view\n{job_id}\n{tenant}\n{expires_at_s}".encode()
    digest = hmac.new(_secret(settings), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def sign_view_token(settings: Settings, job_id: str, tenant: str, now_s: float | None = None) -> str:
    """A token for ``job_id`` of ``tenant`` that expires ``view_link_ttl_s`` from now."""
    expires_at_s = int((now_s if now_s is not None else time.time()) + settings.view_link_ttl_s)
    return f"{expires_at_s}.{_mac(settings, job_id, tenant, expires_at_s)}"


def view_token_valid(settings: Settings, token: str, job_id: str, tenant: str) -> bool:
    """True when ``token`` was signed here for this job and tenant and has not expired."""
    if not token or len(token) > MAX_TOKEN_CHARS or "." not in token:
        return False
    raw_expiry, mac = token.split(".", 1)
    if not raw_expiry.isdigit() or int(raw_expiry) < time.time():
        return False
    return hmac.compare_digest(mac, _mac(settings, job_id, tenant, int(raw_expiry)))


def viewer_link(settings: Settings, rec: JobRecord, job_url: str) -> str | None:
    """``links.view``: the signed page URL, once the job has succeeded with a rendered viewer."""
    if rec.state != SUCCEEDED or not (settings.result_dir(rec.id) / VIEWER_MANIFEST).is_file():
        return None
    return f"{job_url}/view?token={sign_view_token(settings, rec.id, rec.tenant)}"
