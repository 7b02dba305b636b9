"""Job links and completion callbacks: a signed JSON POST to the LIMS, retried, never failing the job.

:func:`job_links` is the one place the URLs of a job and its results are made: the API's job
views and the callback payload both use it.

Signature: ``X-Fprotoseg-Signature: sha256=<hex>`` where hex = HMAC-SHA256(secret,
``<X-Fprotoseg-Timestamp>.<raw body>``). Signing the timestamp with the body lets a receiver
reject replays (compare the timestamp with its clock). Verify with::

    expected = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    hmac.compare_digest(expected, header.removeprefix("sha256="))
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from fprotoseg.worker.service.jobstore import JobRecord
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import SUCCEEDED
from fprotoseg.worker.wsi.result_files import RESULT_FILES

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Fprotoseg-Signature"
TIMESTAMP_HEADER = "X-Fprotoseg-Timestamp"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` over ``timestamp.body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """Constant-time check of a callback signature (what a receiving LIMS does)."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def send_callback(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str | None,
    timeout_s: float = 10.0,
    attempts: int = 4,
    backoff_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """POST ``payload`` as JSON; retry on network errors and 5xx/429. True when a 2xx came back.

    Never raises: a LIMS that is down must not turn a finished segmentation into a failed job.
    """
    import httpx

    body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    delay_s = backoff_s
    for attempt in range(1, attempts + 1):
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: timestamp, "User-Agent": "fprotoseg"}
        if secret:
            headers[SIGNATURE_HEADER] = sign(secret, timestamp, body)
        try:
            response = httpx.post(
                url, content=body, headers=headers, timeout=timeout_s, follow_redirects=False
            )
            if 200 <= response.status_code < 300:
                return True
            retryable = response.status_code >= 500 or response.status_code == 429
            log.warning(
                "callback %s answered %s (attempt %d/%d)", url, response.status_code, attempt, attempts
            )
            if not retryable:
                return False
        except Exception as exc:  # any transport error: log and retry, never propagate
            log.warning("callback %s failed: %s (attempt %d/%d)", url, exc, attempt, attempts)
        if attempt < attempts:
            sleep(delay_s)
            delay_s *= 2
    return False


def job_links(base_url: str, job_id: str, state: str) -> dict[str, str]:
    """``self``, and once the job has succeeded one URL per result file (``/jobs/{id}/{key}``).

    ``base_url`` is FPROTOSEG_PUBLIC_URL (or, in the API, the URL the request came in on);
    empty gives relative links.
    """
    url = f"{base_url.rstrip('/')}/jobs/{job_id}"
    links = {"self": url}
    if state == SUCCEEDED:
        links.update({key: f"{url}/{key}" for key in RESULT_FILES})
    return links


def callback_payload(settings: Settings, rec: JobRecord) -> dict[str, Any]:
    """The JSON body POSTed when a job ends (links absolute when FPROTOSEG_PUBLIC_URL is set)."""
    payload: dict[str, Any] = {
        "job_id": rec.id,
        "state": rec.state,
        "finished_at": rec.finished_at,
        "upload_sha256": rec.upload_sha256,
        "links": job_links(settings.public_url or "", rec.id, rec.state),
    }
    if rec.error_code:
        payload["error"] = {"code": rec.error_code, "message": rec.error_message}
    return payload


def notify(settings: Settings, rec: JobRecord | None) -> None:
    """Send the job's callback, if it asked for one (logged; a failure never fails the job)."""
    if rec is None or not rec.callback_url:
        return
    ok = send_callback(
        rec.callback_url,
        callback_payload(settings, rec),
        secret=settings.callback_secret,
        timeout_s=settings.callback_timeout_s,
        attempts=settings.callback_attempts,
        backoff_s=settings.callback_backoff_s,
    )
    log.info("job %s: callback to %s %s", rec.id, rec.callback_url, "delivered" if ok else "NOT delivered")
