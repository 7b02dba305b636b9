"""``POST /segment``: accept a slide, create (or find) its job, hand it to the workers.

The same bytes with the same parameters, or a repeated ``Idempotency-Key``, from the same tenant
return the existing job (``Idempotent-Replayed: true``), so a LIMS that retries after a timeout
never starts a slide twice; a job that cannot finish any more (failed, cancelled, or lost with
its worker) is never replayed: the retry makes a new job. The stored file is named by the server
(``<job id><ext from the sniffed format>``); the client's file name and metadata are kept as data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from fprotoseg.app.auth import ApiKey, Principal
from fprotoseg.app.deps import DispatcherDep, SettingsDep, StoreDep
from fprotoseg.app.dispatch import Dispatcher
from fprotoseg.app.errors import Problem
from fprotoseg.app.reference import IncomingSlide, receive_reference, remove_incoming, unpack_dicom_zip
from fprotoseg.app.routes.segment_models import SEGMENT_REQUEST_BODY, SegmentAccepted, SegmentFields
from fprotoseg.app.routes.views import base_url, job_view
from fprotoseg.app.upload import receive_upload
from fprotoseg.model.errors import UnknownModelError
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import BrokerUnavailableError, DuplicateJobError
from fprotoseg.worker.service.callbacks import job_links
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.lifecycle import job_is_lost
from fprotoseg.worker.service.maintenance import end_lost_job
from fprotoseg.worker.service.netguard import CallbackURLError, check_callback_url
from fprotoseg.worker.service.segmenters import find_model
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import CANCELLED, FAILED, QUEUED
from fprotoseg.worker.service.strictjson import control_characters
from fprotoseg.worker.wsi.dicom import DICOM_FOLDER_SUFFIX, is_zip_file, series_entry
from fprotoseg.worker.wsi.roi import check_roi_on_slide, parse_roi
from fprotoseg.worker.wsi.validate import SlideFormat, sniff

log = logging.getLogger("fprotoseg.api")
router = APIRouter(tags=["segment"])

MAX_IDEMPOTENCY_KEY_LEN = 200
# formats whose first TIFF image is level 0: the sniffed size is the slide's, so an ROI off it is
# refused at once (for the others, DICOM included, the worker refuses it before reading a tile)
LEVEL0_FIRST_FORMATS = ("aperio-svs", "hamamatsu-ndpi", "ome-tiff")


def _parse_callback(raw: str | None, settings: Settings) -> str | None:
    if not raw:
        return None
    try:
        return check_callback_url(raw, settings.callback_allowed_hosts)
    except CallbackURLError as exc:
        raise Problem(ErrorCode.INVALID_REQUEST, str(exc)) from None


def _parse_model(raw: str | None, settings: Settings) -> str | None:
    """The requested model's name, or None for the configured default (also when named)."""
    if not raw:
        return None
    try:
        _, default = find_model(settings, raw)
    except UnknownModelError as exc:
        raise Problem(
            ErrorCode.UNKNOWN_MODEL, f"{exc.message} (GET /models)", extra={"known_models": exc.known}
        ) from None
    return None if raw == default else raw


def params_hash(
    settings: Settings,
    mpp: float | None,
    callback_url: str | None,
    filename: str = "",
    metadata: dict[str, Any] | None = None,
    model: str | None = None,
    roi: dict[str, Any] | None = None,
    qc_policy: str | None = None,
    outputs: str | None = None,
) -> str:
    """What, besides the bytes, decides a job and how it is described (and so whether an old job
    can be reused): the same slide sent for another case (name, metadata) is a new job."""
    params = {
        "mpp": mpp,
        "callback_url": callback_url,
        "checkpoint": str(settings.checkpoint or "default"),
        "filename": filename,
        "metadata": metadata,
    }
    if model is not None:  # only when named: jobs of the default model keep their earlier hashes
        params["model"] = model
    if roi is not None:  # likewise: jobs without an ROI keep their hashes
        params["roi"] = roi
    if qc_policy is not None:  # likewise: a job that names no QC policy keeps its earlier hash
        params["qc_policy"] = qc_policy
    if outputs is not None:  # likewise: a job without extra outputs keeps its earlier hash
        params["outputs"] = outputs
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:32]


def _accepted(rec: JobRecord, request: Request, settings: Settings, *, replayed: bool) -> JSONResponse:
    url = job_links(base_url(request, settings), rec.id, rec.state)["self"]
    body = {"job_id": rec.id, "status_url": url, "state": rec.state, "job": job_view(rec, request, settings)}
    headers = {"Location": url}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=202, headers=headers)


def _replayable(
    store: JobStore, settings: Settings, dispatcher: Dispatcher, rec: JobRecord | None
) -> JobRecord | None:
    """``rec`` if it can still finish; a job lost with its worker is ended (or requeued) first."""
    if rec is not None and job_is_lost(rec, settings):
        end_lost_job(store, settings, rec, dispatcher.resubmit)
        rec = store.get(rec.id)
    if rec is None or rec.state in (FAILED, CANCELLED):
        return None
    return rec


def _same_submission(rec: JobRecord, sha256: str, phash: str) -> JobRecord:
    """``rec``, found by this request's Idempotency-Key, if it is a job on the same bytes with
    the same parameters; a key reused for another slide is a 422, never another slide's job."""
    if rec.upload_sha256 != sha256 or rec.params_hash != phash:
        raise Problem(
            ErrorCode.IDEMPOTENCY_KEY_REUSED,
            "this Idempotency-Key was used for a different upload; use a new key",
        )
    return rec


def _find_existing(
    store: JobStore,
    settings: Settings,
    dispatcher: Dispatcher,
    who: Principal,
    key: str | None,
    sha256: str,
    phash: str,
) -> JobRecord | None:
    if key:
        found = store.find_by_idempotency_key(key, who.tenant)  # once: a concurrent request may create it
        rec = _replayable(store, settings, dispatcher, found)
        if rec is not None:
            return _same_submission(rec, sha256, phash)
        if found is not None and store.find_by_idempotency_key(key, who.tenant) is not None:
            # a dead job still holds it
            raise Problem(
                ErrorCode.CONFLICT, "this Idempotency-Key belongs to a job still being ended; retry"
            )
    return _replayable(store, settings, dispatcher, store.find_by_content(sha256, phash, who.tenant))


@router.post(
    "/segment",
    status_code=202,
    summary="Upload a slide and start its segmentation",
    openapi_extra=SEGMENT_REQUEST_BODY,
    responses={
        202: {
            "description": "job created (or the existing job for the same upload)",
            "model": SegmentAccepted,
        },
        400: {"description": "empty or malformed upload"},
        401: {"description": "missing or wrong X-API-Key"},
        403: {"description": "slide_uri outside FPROTOSEG_SLIDE_ROOTS (or none set), or access denied"},
        404: {"description": "slide_uri names no file or object"},
        413: {
            "description": "larger than FPROTOSEG_MAX_UPLOAD_MB (FPROTOSEG_SLIDE_CACHE_MAX_MB for "
            "s3://), or a DICOM zip over its caps"
        },
        415: {"description": "not a whole-slide image, or not multipart/form-data"},
        422: {
            "description": "bad form field or callback_url, unknown model, truncated slide, reused "
            "Idempotency-Key, or a bad region of interest (invalid_roi)"
        },
        502: {"description": "the object store holding an s3:// slide did not answer"},
        503: {"description": "job store or broker unreachable, or storage unavailable (Retry-After)"},
        507: {"description": "not enough disk space for the upload (FPROTOSEG_MIN_FREE_MB; Retry-After)"},
    },
)
async def create_segmentation(
    request: Request,
    who: ApiKey,
    settings: SettingsDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=MAX_IDEMPOTENCY_KEY_LEN,
            description="the client's key for this submission: a retry with it returns the same job",
        ),
    ] = None,
) -> JSONResponse:
    if idempotency_key is not None and (char := control_characters(idempotency_key)) is not None:
        raise Problem(ErrorCode.INVALID_REQUEST, f"the Idempotency-Key holds the control character {char}")
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type == "application/json":  # a slide by reference (file:// or s3://)
        upload = await receive_reference(request, settings)
    else:
        received = await receive_upload(
            request, settings.uploads_dir, settings.max_upload_bytes, settings.min_free_mb
        )
        upload = IncomingSlide(
            received.path, received.sha256, received.size_bytes, received.filename, owned=True,
            form=received.fields,
        )
    rec, replayed = await admit_slide(upload, who, idempotency_key, settings, store, dispatcher)
    return _accepted(rec, request, settings, replayed=replayed)


async def vet_slide(upload: IncomingSlide, settings: Settings) -> tuple[IncomingSlide, SlideFormat, str]:
    """(the slide, its sniffed format, the stored file's extension): an uploaded DICOM zip unpacked,
    a DICOM series sniffed through the instance the reader opens; a 4xx problem for what is no
    slide. The first step of every admission, once per distinct slide in a cohort."""
    if upload.owned and await run_in_threadpool(is_zip_file, upload.path):  # a DICOM WSI series
        upload = await run_in_threadpool(unpack_dicom_zip, upload, settings)
    if upload.path.is_dir():  # a DICOM WSI series: sniffed through the instance the reader opens
        entry = await run_in_threadpool(series_entry, upload.path, settings.dicom_zip_max_files)
        return upload, await run_in_threadpool(sniff, entry, entry.name), DICOM_FOLDER_SUFFIX
    fmt = await run_in_threadpool(sniff, upload.path, upload.filename)
    return upload, fmt, fmt.extension


def submission(
    upload: IncomingSlide,
    fmt: SlideFormat,
    who: Principal,
    idempotency_key: str | None,
    settings: Settings,
    model: str | None,
) -> JobRecord:
    """The queued job a vetted slide makes if no job of this tenant has it already: the request's
    fields checked against the server (callback URL, ROI on the slide) and ``params_hash`` set.
    ``model``: the request's model, already resolved by :func:`_parse_model`. The stored path is
    the referenced slide's; an owned copy gets its path when it is moved into place."""
    fields = upload.request if upload.request is not None else SegmentFields.from_form(upload.form)
    callback_url = _parse_callback(fields.callback_url, settings)
    metadata = fields.client_metadata()
    if fields.roi is not None and fmt.name in LEVEL0_FIRST_FORMATS and fmt.width_px and fmt.height_px:
        check_roi_on_slide(parse_roi(fields.roi), fmt.width_px, fmt.height_px)  # else the worker does
    phash = params_hash(
        settings,
        fields.mpp,
        callback_url,
        upload.filename,
        metadata,
        model,
        fields.roi,
        fields.qc_policy,
        fields.outputs,
    )
    return JobRecord(
        id=str(uuid.uuid4()),
        state=QUEUED,
        stage="queued",
        upload_path="" if upload.owned else str(upload.path),
        slide_uri=upload.slide_uri,
        upload_sha256=upload.sha256,
        upload_bytes=upload.size_bytes,
        upload_format=fmt.name,
        filename=upload.filename,
        tenant=who.tenant,
        metadata=metadata,
        mpp=fields.mpp,
        model=model,
        roi=fields.roi,
        qc_policy=fields.qc_policy,
        outputs=fields.outputs,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
        params_hash=phash,
    )


async def admit_slide(
    upload: IncomingSlide,
    who: Principal,
    idempotency_key: str | None,
    settings: Settings,
    store: JobStore,
    dispatcher: Dispatcher,
) -> tuple[JobRecord, bool]:
    """(the job, replayed?) for a received slide: sniffed, its fields checked, matched against
    this tenant's jobs (the same job again) or made a new queued job handed to the workers.

    The one admission path of ``POST /segment`` and of every slide of ``POST /cohorts``. A temp
    copy (``upload.owned``) is moved into place for the job or removed, whatever happens.
    """
    try:
        upload, fmt, extension = await vet_slide(upload, settings)
        fields = upload.request if upload.request is not None else SegmentFields.from_form(upload.form)
        _parse_callback(fields.callback_url, settings)  # refused before an unknown model, as ever
        rec = submission(upload, fmt, who, idempotency_key, settings, _parse_model(fields.model, settings))
        phash = rec.params_hash
        existing = await run_in_threadpool(
            _find_existing, store, settings, dispatcher, who, idempotency_key, upload.sha256, phash
        )
        if existing is not None:
            return existing, True

        job_id = rec.id
        final_path: Path | None = None
        if upload.owned:
            moved = settings.uploads_dir / f"{job_id}{extension}"
            os.replace(upload.path, moved)
            final_path = moved
            # relative to the data dir: API and workers may mount the shared volume at different paths
            rec.upload_path = str(moved.relative_to(settings.data_dir))
        # else read where it is (a slide root, mounted at the same path on the workers)
        try:
            await run_in_threadpool(store.create, rec)
        except DuplicateJobError as dup:  # a concurrent request with the same key or content won
            if final_path is not None:
                remove_incoming(final_path)
            winner = await run_in_threadpool(store.get, dup.existing_id)
            if winner is None:
                raise
            return _same_submission(winner, upload.sha256, phash), True
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
            if final_path is not None:
                remove_incoming(final_path)
            await run_in_threadpool(store.release_idempotency_key, job_id)
            raise BrokerUnavailableError("the job queue (broker) is unreachable; try again") from None
        log.info("job %s: queued (%s, %d bytes, %s)", job_id, fmt.name, upload.size_bytes, upload.sha256[:12])
        return rec, False
    finally:
        if upload.owned:  # a temp copy not moved into place (refused, or replayed); never a referenced slide
            remove_incoming(upload.path)
