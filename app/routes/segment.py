"""``POST /segment``: accept a slide, create (or find) its job, hand it to the workers.

The same bytes with the same parameters, or a repeated ``Idempotency-Key``, return the existing
job (``Idempotent-Replayed: true``), so a LIMS that retries after a timeout never starts a slide
twice. The stored file is named by the server (``<job id><ext from the sniffed format>``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import uuid
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from fprotoseg.app.auth import ApiKey
from fprotoseg.app.deps import DispatcherDep, SettingsDep, StoreDep
from fprotoseg.app.errors import Problem
from fprotoseg.app.routes.views import SegmentAccepted, base_url, job_view
from fprotoseg.app.upload import receive_upload
from fprotoseg.worker.errors import BrokerUnavailableError, DuplicateJobError
from fprotoseg.worker.service.callbacks import job_links
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import FAILED, QUEUED
from fprotoseg.worker.wsi.validate import sniff

log = logging.getLogger("fprotoseg.api")
router = APIRouter(tags=["segment"])

MAX_IDEMPOTENCY_KEY_LEN = 200

_UPLOAD_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "the whole-slide image",
                        },
                        "mpp": {
                            "type": "number",
                            "description": "level-0 µm/px; overrides (or supplies missing) slide metadata",
                        },
                        "callback_url": {
                            "type": "string",
                            "format": "uri",
                            "description": "POSTed a signed JSON body when the job finishes",
                        },
                    },
                }
            }
        },
    }
}


def _parse_mpp(raw: str | None) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise Problem(
            422, f"mpp must be a number of µm per pixel, got {raw[:40]!r}", code="invalid_request"
        ) from None
    if not math.isfinite(value) or not 0.01 <= value <= 100:
        raise Problem(422, "mpp must be between 0.01 and 100 µm per pixel", code="invalid_request")
    return value


def _parse_callback(raw: str | None) -> str | None:
    if not raw:
        return None
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.netloc or len(raw) > 2048:
        raise Problem(422, "callback_url must be an absolute http(s) URL", code="invalid_request")
    return raw


def params_hash(settings: Settings, mpp: float | None, callback_url: str | None) -> str:
    """What, besides the bytes, decides a job's result (and so whether an old job can be reused)."""
    params = {"mpp": mpp, "callback_url": callback_url, "checkpoint": str(settings.checkpoint or "default")}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


def _accepted(rec: JobRecord, request: Request, settings: Settings, *, replayed: bool) -> JSONResponse:
    url = job_links(base_url(request, settings), rec.id, rec.state)["self"]
    body = {"job_id": rec.id, "status_url": url, "state": rec.state, "job": job_view(rec, request, settings)}
    headers = {"Location": url}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


def _find_existing(store: JobStore, key: str | None, sha256: str, phash: str) -> JobRecord | None:
    if key:
        rec = store.find_by_idempotency_key(key)
        if rec is not None:
            if rec.upload_sha256 != sha256 or rec.params_hash != phash:
                raise Problem(
                    422,
                    "this Idempotency-Key was used for a different upload; use a new key",
                    code="idempotency_key_reused",
                )
            return rec
    return store.find_by_content(sha256, phash)


@router.post(
    "/segment",
    status_code=202,
    summary="Upload a slide and start its segmentation",
    openapi_extra=_UPLOAD_SCHEMA,
    responses={
        202: {
            "description": "job created (or the existing job for the same upload)",
            "model": SegmentAccepted,
        },
        400: {"description": "empty or malformed upload"},
        401: {"description": "missing or wrong X-API-Key"},
        413: {"description": "larger than FPROTOSEG_MAX_UPLOAD_MB"},
        415: {"description": "not a whole-slide image"},
        422: {"description": "bad form field, truncated slide, or reused Idempotency-Key"},
    },
)
async def create_segmentation(
    request: Request,
    _: ApiKey,
    settings: SettingsDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> JSONResponse:
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_LEN:
        raise Problem(422, "Idempotency-Key must be 1..200 characters", code="invalid_request")
    upload = await receive_upload(request, settings.uploads_dir, settings.max_upload_bytes)
    try:
        fmt = await run_in_threadpool(sniff, upload.path, upload.filename)
        mpp = _parse_mpp(upload.fields.get("mpp"))
        callback_url = _parse_callback(upload.fields.get("callback_url"))
        phash = params_hash(settings, mpp, callback_url)
        existing = await run_in_threadpool(_find_existing, store, idempotency_key, upload.sha256, phash)
        if existing is not None:
            return _accepted(existing, request, settings, replayed=True)

        job_id = str(uuid.uuid4())
        final_path = settings.uploads_dir / f"{job_id}{fmt.extension}"
        os.replace(upload.path, final_path)
        rec = JobRecord(
            id=job_id,
            state=QUEUED,
            stage="queued",
            # relative to the data dir: API and workers may mount the shared volume at different paths
            upload_path=str(final_path.relative_to(settings.data_dir)),
            upload_sha256=upload.sha256,
            upload_bytes=upload.size_bytes,
            upload_format=fmt.name,
            filename=upload.filename,
            mpp=mpp,
            callback_url=callback_url,
            idempotency_key=idempotency_key,
            params_hash=phash,
        )
        try:
            await run_in_threadpool(store.create, rec)
        except DuplicateJobError as dup:  # a concurrent request with the same key won the race
            final_path.unlink(missing_ok=True)
            winner = await run_in_threadpool(store.get, dup.existing_id)
            if winner is None:
                raise
            return _accepted(winner, request, settings, replayed=True)
        try:
            await run_in_threadpool(dispatcher.submit, job_id)
        except Exception as exc:
            log.error("job %s: could not be queued: %s", job_id, exc)
            await run_in_threadpool(
                store.transition,
                job_id,
                FAILED,
                [QUEUED],
                stage="failed",
                error_code=BrokerUnavailableError.code,
                error_message="the job could not be queued (broker unreachable); upload it again",
            )
            raise BrokerUnavailableError("the job queue (broker) is unreachable; try again") from None
        log.info("job %s: queued (%s, %d bytes, %s)", job_id, fmt.name, upload.size_bytes, upload.sha256[:12])
        return _accepted(rec, request, settings, replayed=False)
    finally:
        upload.path.unlink(missing_ok=True)
