"""``/cohorts``: a study's slides in one request, one job per slide, one table and one callback.

``POST /cohorts`` takes a JSON body naming up to 1,000 slides by URI (each as ``POST /segment``
takes ``slide_uri``, with its own ``mpp`` if it needs one) and admits them all at once
(:mod:`fprotoseg.app.cohort_admission`: each distinct slide read once, the jobs written in one
store transaction), each entry the job ``POST /segment`` would make of it: deduplicated per
tenant, so a slide already segmented with the same parameters is its existing job. A slide that
cannot be admitted (no such file, not a slide, outside the slide roots) becomes a failed job with
its error code; the others go on. Only what concerns the whole request (a malformed body, an
unknown model, a callback URL that may not be called) refuses it, and a server-side outage (job
store, broker) answers 503: a retry is cheap, the slides admitted meanwhile are found again.

Tenancy is the jobs': another tenant's cohort is ``404 cohort_not_found``, like a missing one.
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fprotoseg.app.auth import ApiKey, Principal
from fprotoseg.app.cohort_admission import admit_cohort
from fprotoseg.app.deps import DispatcherDep, SettingsDep, StoreDep
from fprotoseg.app.errors import Problem
from fprotoseg.app.json_body import read_json_body
from fprotoseg.app.problems import validation_detail
from fprotoseg.app.routes.segment import _parse_callback, _parse_model
from fprotoseg.app.routes.segment_models import (
    MAX_EXTERNAL_ID_CHARS,
    MAX_MPP,
    MAX_URI_CHARS,
    MIN_MPP,
    SegmentReference,
)
from fprotoseg.app.routes.views import base_url, iso
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.cohorts import (
    ID_COLUMNS,
    MAX_COHORT_SLIDES,
    cancel_not_started,
    cohort_links,
    counts,
    member_jobs,
    settle,
    stats_rows,
)
from fprotoseg.worker.service.cohortstore import COHORT_RUNNING, CohortMember, CohortRecord, CohortStore
from fprotoseg.worker.service.jobstore import JobStore
from fprotoseg.worker.service.netguard import MAX_URL_CHARS
from fprotoseg.worker.wsi.cohort_table import table_json, table_records, to_csv

router = APIRouter(tags=["cohorts"])

# 1,000 slides with a long URI and a full metadata object each fit
MAX_COHORT_BODY_BYTES = 8 * 2**20
MAX_COHORT_ID_CHARS = 64
POLL_AFTER_S = 5


class CohortSlideIn(BaseModel):
    """One slide of a cohort: named by URI, with the client's identifiers."""

    model_config = ConfigDict(extra="forbid")

    slide_uri: str = Field(
        min_length=1, max_length=MAX_URI_CHARS, description="as POST /segment takes it"
    )
    external_id: str | None = Field(default=None, max_length=MAX_EXTERNAL_ID_CHARS)
    metadata: dict[str, Any] | None = Field(default=None, description="as POST /segment takes it")
    mpp: float | None = Field(
        default=None,
        ge=MIN_MPP,
        le=MAX_MPP,
        allow_inf_nan=False,
        description="this slide's level-0 µm/px (wins over the cohort's mpp): for a slide whose file "
        "records none, or records it wrong",
    )


class CohortRequest(BaseModel):
    """The body of ``POST /cohorts``; ``model`` applies to every slide, ``mpp`` to every slide
    that does not give its own."""

    model_config = ConfigDict(extra="forbid")

    slides: list[CohortSlideIn] = Field(min_length=1, max_length=MAX_COHORT_SLIDES)
    model: str | None = Field(default=None, description="a model name from GET /models")
    mpp: float | None = Field(default=None, ge=MIN_MPP, le=MAX_MPP, allow_inf_nan=False)
    callback_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        description="POSTed one signed JSON body when every slide of the cohort has ended",
    )


def _inlined_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined: a request body in the OpenAPI document
    cannot point at ``#/$defs/...`` (there is no such place in the document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    inlined: dict[str, Any] = inline(schema)
    return inlined


class CohortJobRef(BaseModel):
    job_id: str
    external_id: str | None


class CohortAccepted(BaseModel):
    cohort_id: str
    status_url: str
    jobs: list[CohortJobRef]


def cohort_store(request: Request) -> CohortStore:
    store: CohortStore = request.app.state.cohorts
    return store


async def _read_body(request: Request) -> CohortRequest:
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != "application/json":
        raise Problem(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE, "POST /cohorts takes a JSON body (application/json)"
        )
    doc = await read_json_body(request, MAX_COHORT_BODY_BYTES)
    try:
        return CohortRequest.model_validate(doc, strict=True)
    except ValidationError as exc:
        raise Problem(ErrorCode.INVALID_REQUEST, validation_detail(exc.errors())) from None


def _references(req: CohortRequest) -> list[SegmentReference]:
    """Each slide as a ``POST /segment`` JSON body, validated the same way (all before any runs)."""
    refs = []
    for index, slide in enumerate(req.slides):
        doc: dict[str, Any] = {"slide_uri": slide.slide_uri}
        for key, value in (
            ("external_id", slide.external_id),
            ("metadata", slide.metadata),
            ("model", req.model),
            ("mpp", slide.mpp if slide.mpp is not None else req.mpp),
            ("callback_url", None),  # one callback for the cohort, none per slide
        ):
            if value is not None:
                doc[key] = value
        try:
            refs.append(SegmentReference.from_json(doc))
        except Problem as exc:
            raise Problem(ErrorCode.INVALID_REQUEST, f"slides[{index}]: {exc.detail}") from None
    return refs


@router.post(
    "/cohorts",
    status_code=202,
    summary="Start a cohort: up to 1,000 slides by URI, one job per slide",
    response_model=CohortAccepted,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inlined_schema(CohortRequest)}},
        }
    },
    responses={
        400: {"description": "the body is not valid JSON"},
        401: {"description": "missing or wrong X-API-Key"},
        413: {"description": "body larger than 8 MiB"},
        415: {"description": "not a JSON body"},
        422: {
            "description": "malformed body, more than 1,000 slides, unknown model or bad callback_url"
        },
        503: {"description": "job store or broker unreachable (slides admitted so far are found again)"},
    },
)
async def create_cohort(
    request: Request, who: ApiKey, settings: SettingsDep, store: StoreDep, dispatcher: DispatcherDep
) -> JSONResponse:
    req = await _read_body(request)
    refs = _references(req)
    # what concerns the whole cohort is refused before any slide is admitted
    callback_url = _parse_callback(req.callback_url, settings)
    model = _parse_model(req.model, settings)
    members: list[CohortMember] = []
    jobs = await admit_cohort(refs, model, who, settings, store, dispatcher)
    for slide, rec in zip(req.slides, jobs, strict=True):
        external_id = slide.external_id or (slide.metadata or {}).get("external_id")
        members.append(CohortMember(rec.id, str(external_id) if external_id is not None else None))
    cohort = CohortRecord(
        id=str(uuid.uuid4()),
        tenant=who.tenant,
        members=members,
        model=model,
        mpp=req.mpp,
        callback_url=callback_url,
    )
    await run_in_threadpool(cohort_store(request).create, cohort)
    url = cohort_links(base_url(request, settings), cohort.id)["self"]
    body = {
        "cohort_id": cohort.id,
        "status_url": url,
        "jobs": [{"job_id": m.job_id, "external_id": m.external_id} for m in members],
    }
    return JSONResponse(body, status_code=202, headers={"Location": url})


def load_cohort(cohorts: CohortStore, cohort_id: str, who: Principal) -> CohortRecord:
    """The cohort, if this caller may see it; another tenant's is a 404 exactly like a missing one."""
    rec = cohorts.get(cohort_id) if 0 < len(cohort_id) <= MAX_COHORT_ID_CHARS else None
    if rec is None or not (who.admin or rec.tenant == who.tenant):
        raise Problem(ErrorCode.COHORT_NOT_FOUND, f"no cohort {cohort_id[:MAX_COHORT_ID_CHARS]!r}")
    return rec


def _view(request: Request, cohort_id: str, who: Principal) -> dict[str, Any]:
    settings = request.app.state.settings
    store: JobStore = request.app.state.store
    cohorts = cohort_store(request)
    cohort = load_cohort(cohorts, cohort_id, who)
    jobs = member_jobs(store, cohort)
    cohort = settle(cohorts, cohort, [j for _, _, j in jobs])
    return {
        "cohort_id": cohort.id,
        "state": cohort.state,
        "created_at": iso(cohort.created_at),
        "ended_at": iso(cohort.ended_at),
        "counts": counts([j for _, _, j in jobs]),
        "model": cohort.model,
        "mpp": cohort.mpp,
        "callback_url": cohort.callback_url,
        "callback_status": cohort.callback_status,
        "cancel_requested": cohort.cancel_requested,
        "jobs": [
            {
                "job_id": job_id,
                "external_id": external_id,
                "state": job.state if job is not None else "deleted",
                "progress": round(job.progress, 4) if job is not None else None,
                "error": {"code": job.error_code, "message": job.error_message}
                if job is not None and job.error_code
                else None,
            }
            for job_id, external_id, job in jobs
        ],
        "links": cohort_links(base_url(request, settings), cohort.id),
    }


@router.get(
    "/cohorts/{cohort_id}",
    summary="A cohort: running or ended, jobs per state, and its jobs",
    responses={404: {"description": "no such cohort (or another tenant's)"}},
)
def get_cohort(cohort_id: str, request: Request, response: Response, who: ApiKey) -> dict[str, Any]:
    view = _view(request, cohort_id, who)
    if view["state"] == COHORT_RUNNING:
        response.headers["Retry-After"] = str(POLL_AFTER_S)
    return view


def _table(request: Request, cohort_id: str, who: Principal) -> tuple[CohortRecord, Any]:
    cohort = load_cohort(cohort_store(request), cohort_id, who)
    return cohort, stats_rows(request.app.state.settings, member_jobs(request.app.state.store, cohort))


@router.get(
    "/cohorts/{cohort_id}/stats.csv",
    summary="One row per slide: identifiers, state, error code, tissue µm², per class µm² and fraction",
    responses={
        200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
        404: {"description": "no such cohort (or another tenant's)"},
    },
)
def cohort_stats_csv(cohort_id: str, request: Request, who: ApiKey) -> Response:
    cohort, rows = _table(request, cohort_id, who)
    columns, records = table_records(rows, ID_COLUMNS)
    return Response(
        to_csv(columns, records),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="cohort-{cohort.id}.csv"'},
    )


@router.get(
    "/cohorts/{cohort_id}/stats.json",
    summary="The cohort table as JSON: per slide its identifiers, state, error and areas",
    responses={404: {"description": "no such cohort (or another tenant's)"}},
)
def cohort_stats_json(cohort_id: str, request: Request, who: ApiKey) -> dict[str, Any]:
    cohort, rows = _table(request, cohort_id, who)
    return {"cohort_id": cohort.id, **table_json(rows, ID_COLUMNS)}


@router.delete(
    "/cohorts/{cohort_id}",
    status_code=202,
    summary="Cancel the cohort's jobs that have not started (running ones finish)",
    responses={404: {"description": "no such cohort (or another tenant's)"}},
)
def cancel_cohort(
    cohort_id: str, request: Request, who: ApiKey, settings: SettingsDep, store: StoreDep
) -> JSONResponse:
    cohorts = cohort_store(request)
    cohort = load_cohort(cohorts, cohort_id, who)
    cohorts.modify(cohort.id, lambda r: True, cancel_requested=True)
    cancelled = cancel_not_started(settings, store, cohort)
    return JSONResponse({**_view(request, cohort_id, who), "cancelled": cancelled}, status_code=202)
