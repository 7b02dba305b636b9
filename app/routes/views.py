"""The JSON shape of a job, shared by POST /segment, GET /jobs and GET /jobs/{id}."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import SkipJsonSchema

from fprotoseg.app.viewlink import viewer_link
from fprotoseg.model.catalog import default_model_name
from fprotoseg.worker.service.callbacks import job_links
from fprotoseg.worker.service.jobstore import JobRecord
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import PUBLISHING_STAGE, QUEUED, RUNNING, JobState
from fprotoseg.worker.service.strictjson import json_safe


class JobErrorView(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. missing_mpp")
    message: str = Field(description="one line for a human, naming the fix")


class ProblemView(BaseModel):
    """RFC 9457 problem details (``application/problem+json``): every error the API returns."""

    type: str = Field(description="urn:fprotoseg:problem:<code>")
    title: str
    status: int
    detail: str = Field(description="one line for a human; never a stack trace or a server path")
    code: str = Field(description="stable machine-readable code, e.g. upload_too_large")
    instance: str | None = None


class UploadView(BaseModel):
    filename: str = Field(description="the client's file name exactly as sent (data only, never a path)")
    sha256: str
    size_bytes: int
    format: str = Field(
        description="sniffed from the bytes: aperio-svs, hamamatsu-ndpi, ome-tiff, tiff, dicom, …"
    )
    slide_uri: str | None = Field(
        default=None, description="the file:// or s3:// URI the slide was named by (null: uploaded)"
    )


class QcSummaryView(BaseModel):
    """Slide QC as a LIMS keys on it (``qc.json`` has every value and threshold)."""

    verdict: str = Field(description="pass, warn (policy warn, some check failed) or refused")
    policy: str = Field(description="warn or refuse")
    codes: list[str] = Field(description="the failed checks' codes, e.g. artefact_area_high")
    artefact_area_um2: dict[str, float] = Field(
        description="area per artefact (out_of_focus, pen_ink, over_exposed, fold, any) in µm²"
    )
    excluded_area_um2: float = Field(description="tissue left out of the class areas and polygons, µm²")


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


def _link(description: str) -> Any:
    """An optional link: absent from the JSON (never ``null``) until it exists; typed ``string``."""
    return Field(
        default=None, description=description, exclude_if=lambda v: v is None, json_schema_extra=_no_default
    )


class JobLinks(BaseModel):
    """Where the job and its results are: ``self`` always, one URL per result file once the job
    has succeeded (each a key of the result layout), ``view`` while viewer links are on. A key
    a newer server adds is passed through, never dropped."""

    model_config = ConfigDict(extra="allow")

    self: str = Field(description="GET /jobs/{id}")
    geojson: str | SkipJsonSchema[None] = _link("GET /jobs/{id}/geojson, once succeeded")
    stats: str | SkipJsonSchema[None] = _link("GET /jobs/{id}/stats, once succeeded")
    mask: str | SkipJsonSchema[None] = _link("GET /jobs/{id}/mask, once succeeded")
    overlay: str | SkipJsonSchema[None] = _link("GET /jobs/{id}/overlay, once succeeded")
    provenance: str | SkipJsonSchema[None] = _link("GET /jobs/{id}/provenance, once succeeded")
    qc: str | SkipJsonSchema[None] = _link("GET /jobs/{id}/qc, once succeeded")
    probabilities: str | SkipJsonSchema[None] = _link(
        "GET /jobs/{id}/probabilities.ome.tiff, once succeeded, if the request set outputs=probabilities"
    )
    view: str | SkipJsonSchema[None] = _link(
        "the result viewer page as a signed link valid for FPROTOSEG_VIEW_LINK_TTL_S (no key needed), "
        "once succeeded"
    )


class JobView(BaseModel):
    """One job as the API shows it."""

    job_id: str
    state: JobState
    progress: float = Field(ge=0, le=1)
    stage: str
    error: JobErrorView | None
    created_at: str | None = Field(description="ISO 8601 UTC")
    started_at: str | None
    finished_at: str | None
    updated_at: str | None
    attempts: int = Field(description="deliveries so far (more than 1 after a worker was lost)")
    cancel_requested: bool
    cancellable: bool = Field(
        description="whether a DELETE stops the job: true while it is queued or running, until it "
        "publishes its results; false from then on and once it has ended. After a DELETE, "
        "cancel_requested true with cancellable true means it will end cancelled; with cancellable "
        "false the request came too late and the job ends as it would have (usually succeeded)"
    )
    upload: UploadView
    mpp: float | None = Field(description="µm/px given with the upload (overrides slide metadata)")
    model: str = Field(description="the model the job runs (a name from GET /models)")
    callback_url: str | None
    callback_status: str | None = Field(description="pending, delivered or failed; null without a callback")
    idempotency_key: str | None = Field(description="the Idempotency-Key the job was submitted with")
    metadata: dict[str, Any] | None = Field(description="the client's metadata object (e.g. external_id)")
    tenant: str = Field(description="the tenant of the API key that submitted the job")
    outputs: str | None = Field(default=None, description="optional outputs asked for (probabilities)")
    qc: QcSummaryView | None = Field(default=None, description="slide QC summary, once succeeded")
    tiles: int | None = Field(description="tiles inferred, once succeeded")
    duration_s: float | None
    links: JobLinks = Field(description="self, and the result URLs once succeeded")


class JobList(BaseModel):
    jobs: list[JobView]
    total: int
    limit: int
    offset: int
    next: str | None = Field(description="URL of the next page, or null")


def iso(ts: float | None) -> str | None:
    """UNIX seconds -> ISO 8601 UTC with milliseconds (``2026-01-02T03:04:05.678Z``)."""
    if ts is None:
        return None
    return (
        datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def base_url(request: Request, settings: Settings) -> str:
    return (settings.public_url or str(request.base_url)).rstrip("/")


def job_view(rec: JobRecord, request: Request, settings: Settings) -> dict[str, Any]:
    links = job_links(base_url(request, settings), rec.id, rec.state, rec.outputs)
    view = viewer_link(settings, rec, links["self"])
    if view:  # signed: a browser opened from a LIMS cannot send the X-API-Key header
        links["view"] = view
    return {
        "job_id": rec.id,
        "state": rec.state,
        "progress": round(rec.progress, 4),
        "stage": rec.stage,
        "error": {"code": rec.error_code, "message": rec.error_message} if rec.error_code else None,
        "created_at": iso(rec.created_at),
        "started_at": iso(rec.started_at),
        "finished_at": iso(rec.finished_at),
        "updated_at": iso(rec.updated_at),
        "attempts": rec.attempts,
        "cancel_requested": rec.cancel_requested,
        "cancellable": rec.state == QUEUED or (rec.state == RUNNING and rec.stage != PUBLISHING_STAGE),
        "upload": {
            "filename": rec.filename,
            "sha256": rec.upload_sha256,
            "size_bytes": rec.upload_bytes,
            "format": rec.upload_format,
            "slide_uri": rec.slide_uri,
        },
        "mpp": rec.mpp,
        "model": rec.model or default_model_name(settings.checkpoint),
        "callback_url": rec.callback_url,
        "callback_status": rec.callback_status,
        "idempotency_key": rec.idempotency_key,
        "metadata": json_safe(rec.metadata),  # an older version stored NaN, "\ud800": still listed
        "tenant": rec.tenant,
        "outputs": rec.outputs,
        "qc": json_safe(rec.qc),
        "tiles": rec.tiles,
        "duration_s": rec.duration_s,
        "links": links,
    }
