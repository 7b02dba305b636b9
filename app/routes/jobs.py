"""``GET /jobs`` (newest first, paginated), ``GET /jobs/{id}``, ``DELETE /jobs/{id}`` (cancel)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse

from fprotoseg.app.auth import ApiKey, Principal
from fprotoseg.app.deps import DispatcherDep, SettingsDep, StoreDep
from fprotoseg.app.errors import Problem
from fprotoseg.app.routes.views import JobList, JobView, base_url, job_view
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.lifecycle import job_is_lost
from fprotoseg.worker.service.maintenance import end_lost_job
from fprotoseg.worker.service.states import CANCELLED, FAILED, SUCCEEDED, JobState

router = APIRouter(tags=["jobs"])

POLL_AFTER_S = 2
MAX_JOB_ID_CHARS = 64
MAX_OFFSET = 10**9


def load_job(store: JobStore, job_id: str, who: Principal) -> JobRecord:
    """The job, if this caller may see it; another tenant's job is a 404 exactly like a missing
    one (same status, code and detail), so job ids cannot be probed across tenants."""
    rec = store.get(job_id) if 0 < len(job_id) <= MAX_JOB_ID_CHARS else None
    if rec is None or not who.may_see(rec):
        raise Problem(ErrorCode.JOB_NOT_FOUND, f"no job {job_id[:MAX_JOB_ID_CHARS]!r}")
    return rec


@router.get("/jobs", summary="List jobs, newest first", response_model=JobList)
def list_jobs(
    request: Request,
    who: ApiKey,
    settings: SettingsDep,
    store: StoreDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    state: JobState | None = None,
) -> dict[str, Any]:
    limit = min(limit, settings.jobs_page_max)
    records, total = store.page(limit=limit, offset=offset, state=state, tenant=who.list_filter)
    next_url = None
    if offset + len(records) < total:
        query = f"limit={limit}&offset={offset + limit}" + (f"&state={state}" if state else "")
        next_url = f"{base_url(request, settings)}/jobs?{query}"
    return {
        "jobs": [job_view(r, request, settings) for r in records],
        "total": total,
        "limit": limit,
        "offset": offset,
        "next": next_url,
    }


@router.get(
    "/jobs/{job_id}",
    summary="State, progress and result links of one job",
    response_model=JobView,
    responses={404: {"description": "no such job"}},
)
def get_job(
    job_id: str, request: Request, response: Response, who: ApiKey, settings: SettingsDep, store: StoreDep
) -> dict[str, Any]:
    rec = load_job(store, job_id, who)
    if not rec.terminal:
        response.headers["Retry-After"] = str(POLL_AFTER_S)  # a polite polling interval for a LIMS
    return job_view(rec, request, settings)


@router.delete(
    "/jobs/{job_id}",
    status_code=202,
    summary="Cancel a job (stops at its next batch or before it publishes; `cancellable` says whether)",
    response_model=JobView,
    responses={404: {"description": "no such job"}, 409: {"description": "the job has already finished"}},
)
def cancel_job(
    job_id: str,
    request: Request,
    who: ApiKey,
    settings: SettingsDep,
    store: StoreDep,
    dispatcher: DispatcherDep,
) -> JSONResponse:
    rec = load_job(store, job_id, who)
    if rec.state in (SUCCEEDED, FAILED):
        raise Problem(ErrorCode.JOB_FINISHED, f"job {job_id} has already {rec.state}; nothing to cancel")
    if rec.state != CANCELLED:
        rec = store.request_cancel(job_id) or rec
        if job_is_lost(rec, settings):  # no worker will see the flag: end the job here
            rec = end_lost_job(store, settings, rec, dispatcher.resubmit) or store.get(job_id) or rec
    return JSONResponse(job_view(rec, request, settings), status_code=202)
