"""Job links and completion callbacks: a signed JSON POST to the LIMS, off the job's critical path.

:func:`job_links` is the one place the URLs of a job and its results are made: the API's job
views and the callback payload both use it.

Delivery is an outbox: ending a job only records "callback pending" in the job store
(:func:`enqueue`); a :class:`CallbackOutbox` thread in each worker process takes due entries, makes
one attempt each (bounded by FPROTOSEG_CALLBACK_TIMEOUT_S), and reschedules failures with a
doubling back-off until FPROTOSEG_CALLBACK_ATTEMPTS. A receiver that never answers therefore
costs a worker nothing, and a worker that dies mid-delivery leaves the entry to be retried.

Every callback is signed: with FPROTOSEG_CALLBACK_SECRET, or else with a secret generated once
into ``<data dir>/callback-secret`` (0600), like the API key. The target is checked and pinned by
:mod:`fprotoseg.worker.service.netguard`; redirects are never followed.

Signature: ``X-Fprotoseg-Signature: sha256=<hex>`` where hex = HMAC-SHA256(secret,
``<X-Fprotoseg-Timestamp>.<raw body>``). Signing the timestamp with the body lets a receiver
reject replays (compare the timestamp with its clock). Verify with::

    expected = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    hmac.compare_digest(expected, header.removeprefix("sha256="))
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.netguard import CallbackTarget, CallbackURLError, resolve_for_delivery
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import SUCCEEDED, TERMINAL_STATES
from fprotoseg.worker.service.storage import load_or_create_secret
from fprotoseg.worker.wsi.result_files import PROBABILITIES_NAME, RESULT_FILES

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Fprotoseg-Signature"
TIMESTAMP_HEADER = "X-Fprotoseg-Timestamp"
Outcome = Literal["delivered", "retry", "give_up"]


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` over ``timestamp.body``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """Constant-time check of a callback signature (what a receiving LIMS does)."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def signing_secret(settings: Settings) -> str:
    """FPROTOSEG_CALLBACK_SECRET, or the per-install secret generated in the data dir."""
    if settings.callback_secret:
        return settings.callback_secret
    return load_or_create_secret(settings.callback_secret_file)[0]


def _pinned_request(target: CallbackTarget) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(URL with the checked IP in place of the host, Host header, httpx extensions): the
    connection goes to the address that was checked, TLS still verifies the host name (SNI)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(target.url)
    ip = f"[{target.address}]" if ":" in target.address else target.address
    default_port = 443 if target.scheme == "https" else 80
    netloc = ip if target.port == default_port else f"{ip}:{target.port}"
    host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host and not target.host.startswith("["):
        host_header = f"[{target.host}]" + ("" if target.port == default_port else f":{target.port}")
    extensions: dict[str, Any] = {"sni_hostname": target.host} if target.scheme == "https" else {}
    return (
        urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
        {"Host": host_header},
        extensions,
    )


def post_once(url: str, body: bytes, *, secret: str, timeout_s: float, allowed_hosts: list[str]) -> Outcome:
    """One signed POST to the checked, pinned address: delivered, worth a retry, or not.

    Never raises: a LIMS that is down must not turn a finished segmentation into a failed job.
    """
    import httpx

    try:
        target = resolve_for_delivery(url, allowed_hosts)
    except CallbackURLError as exc:
        log.warning("callback refused: %s", exc)
        # A name that does not resolve may be a DNS blip; an address that may not be called is final.
        return "retry" if "does not resolve" in str(exc) else "give_up"
    pinned_url, host_header, extensions = _pinned_request(target)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: sign(secret, timestamp, body),
        "User-Agent": "fprotoseg",
        **host_header,
    }
    try:
        # trust_env=False: no proxy from the environment may re-route a checked request.
        with httpx.Client(timeout=timeout_s, follow_redirects=False, trust_env=False) as client:
            response = client.post(pinned_url, content=body, headers=headers, extensions=extensions)
    except Exception as exc:  # any transport error: retried
        log.warning("callback to %s failed: %s", target.host, exc)
        return "retry"
    if 200 <= response.status_code < 300:
        return "delivered"
    log.warning("callback to %s answered %s", target.host, response.status_code)
    return "retry" if response.status_code >= 500 or response.status_code == 429 else "give_up"


def send_callback(
    url: str,
    payload: dict[str, Any],
    *,
    secret: str,
    timeout_s: float = 10.0,
    attempts: int = 4,
    backoff_s: float = 1.0,
    allowed_hosts: list[str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Deliver in the caller's thread with retries (tools and tests); the service uses the outbox."""
    body = encode_payload(payload)
    delay_s = backoff_s
    for attempt in range(1, attempts + 1):
        outcome = post_once(url, body, secret=secret, timeout_s=timeout_s, allowed_hosts=allowed_hosts or [])
        if outcome != "retry":
            return outcome == "delivered"
        if attempt < attempts:
            sleep(delay_s)
            delay_s *= 2
    return False


def encode_payload(payload: dict[str, Any]) -> bytes:
    """UTF-8 JSON (RFC 8259). Raises ValueError for a string with a lone surrogate
    (UnicodeEncodeError) or a NaN or infinite number (stored by an older version): such a body is
    not JSON a receiver could verify and parse, so it is never sent."""
    return json.dumps(
        payload, separators=(",", ":"), sort_keys=True, ensure_ascii=False, allow_nan=False
    ).encode()


def job_links(base_url: str, job_id: str, state: str, outputs: str | None = None) -> dict[str, str]:
    """``self``, and once the job has succeeded one URL per result file (``/jobs/{id}/{key}``),
    and ``probabilities`` (``/jobs/{id}/probabilities.ome.tiff``) when ``outputs`` asked for it.

    ``base_url`` is FPROTOSEG_PUBLIC_URL (or, in the API, the URL the request came in on);
    empty gives relative links.
    """
    url = f"{base_url.rstrip('/')}/jobs/{job_id}"
    links = {"self": url}
    if state == SUCCEEDED:
        links.update({key: f"{url}/{key}" for key in RESULT_FILES})
        if outputs == "probabilities":
            links["probabilities"] = f"{url}/{PROBABILITIES_NAME}"
    return links


def callback_payload(settings: Settings, rec: JobRecord) -> dict[str, Any]:
    """The JSON body POSTed when a job ends: what a LIMS needs to match it to its case (the
    client's file name, metadata and Idempotency-Key), where the results are, and the slide QC
    summary (verdict, codes, artefact areas in µm²) a LIMS keys on without fetching qc.json."""
    payload: dict[str, Any] = {
        "job_id": rec.id,
        "state": rec.state,
        "finished_at": rec.finished_at,
        "upload_sha256": rec.upload_sha256,
        "filename": rec.filename,
        "metadata": rec.metadata,
        "idempotency_key": rec.idempotency_key,
        "links": job_links(settings.public_url or "", rec.id, rec.state, rec.outputs),
    }
    if rec.qc is not None:
        payload["qc"] = rec.qc
    if rec.error_code:
        payload["error"] = {"code": rec.error_code, "message": rec.error_message}
    return payload


def enqueue(store: JobStore, rec: JobRecord | None) -> None:
    """Put a finished job's callback in the outbox (no network here: the job's path stays short)."""
    if rec is None or not rec.callback_url:
        return
    try:
        store.schedule_callback(rec.id, time.time())
    except JobStoreError as exc:
        log.error("job %s: callback could not be scheduled: %s", rec.id, exc.message)


def deliver_due(settings: Settings, store: JobStore, *, now: float | None = None) -> int:
    """One pass over the outbox: one attempt per due callback. Returns the attempts made."""
    now = time.time() if now is None else now
    lease_s = settings.callback_timeout_s + 30.0
    made = 0
    secret = signing_secret(settings)
    for job_id in store.due_callbacks(now):
        if not store.claim_callback(job_id, now, lease_s):
            continue  # another worker took it
        rec = store.get(job_id)
        if rec is None or not rec.callback_url or rec.state not in TERMINAL_STATES:
            store.unschedule_callback(job_id)
            continue
        made += 1
        attempt = rec.callback_attempts + 1
        try:
            body = encode_payload(callback_payload(settings, rec))
        except ValueError as exc:  # a lone surrogate or a NaN stored by an older version
            # No later pass can encode it either: fail it now, once, instead of at every lease expiry.
            log.error("job %s: callback payload cannot be encoded as JSON (%s); not sent", job_id, exc)
            outcome: Outcome = "give_up"
        else:
            outcome = post_once(
                rec.callback_url,
                body,
                secret=secret,
                timeout_s=settings.callback_timeout_s,
                allowed_hosts=settings.callback_allowed_hosts,
            )
        if outcome == "retry" and attempt < settings.callback_attempts:
            store.annotate(job_id, callback_status="pending", callback_attempts=attempt)
            store.schedule_callback(job_id, time.time() + settings.callback_backoff_s * 2 ** (attempt - 1))
            continue
        status = "delivered" if outcome == "delivered" else "failed"
        store.annotate(job_id, callback_status=status, callback_attempts=attempt)
        store.unschedule_callback(job_id)
        log.info("job %s: callback %s after %d attempt(s)", job_id, status, attempt)
    return made


class CallbackOutbox:
    """A daemon thread delivering due callbacks beside the jobs of this worker process."""

    def __init__(self, settings: Settings, store: JobStore, poll_interval_s: float = 1.0) -> None:
        self.settings, self.store, self.poll_interval_s = settings, store, poll_interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="callback-outbox", daemon=True)

    def start(self) -> CallbackOutbox:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        with contextlib.suppress(RuntimeError):
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                deliver_due(self.settings, self.store)
            except Exception as exc:  # a store blip or a bug: log, keep the thread alive
                log.warning("callback outbox: %s", exc)
            self._stop.wait(self.poll_interval_s)
