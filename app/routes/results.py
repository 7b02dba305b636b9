"""Result files of a succeeded job: ``/geojson`` (gzip when asked), ``/stats``, ``/mask``,
``/overlay``, ``/provenance``, ``/seg.dcm`` where the input was a DICOM WSI, and
``/probabilities.ome.tiff`` where the request asked for it. Served straight from the job's
published results directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse

from fprotoseg.app.auth import ApiKey, Principal
from fprotoseg.app.deps import SettingsDep, StoreDep
from fprotoseg.app.errors import Problem
from fprotoseg.app.routes.jobs import load_job
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import SUCCEEDED
from fprotoseg.worker.wsi.result_files import (
    GZIP_SUFFIX,
    MEDIA_TYPES,
    OPTIONAL_RESULT_FILES,
    RESULT_FILES,
    results_complete,
)

router = APIRouter(tags=["results"])


def _responses(name: str) -> dict[int | str, dict[str, Any]]:
    """The file's own media type for 200 (not FastAPI's default application/json), and the errors."""
    media = MEDIA_TYPES[name]
    schema: dict[str, Any] = (
        {"type": "object"} if media.endswith("json") else {"type": "string", "format": "binary"}
    )
    return {
        200: {
            "description": RESULT_FILES.get(name) or OPTIONAL_RESULT_FILES[name],
            "content": {media: {"schema": schema}},
        },
        404: {"description": "no such job (or another tenant's), or its results are gone"},
        409: {"description": "the job has not succeeded (yet)"},
    }


def published_results(settings: Settings, rec: JobRecord, what: str = "results exist") -> Path:
    """The job's published results directory: ``409 results_not_ready`` until the job succeeded,
    ``404 results_missing`` when its files are gone (the one rule for results and the viewer)."""
    if rec.state != SUCCEEDED:
        raise Problem(
            ErrorCode.RESULTS_NOT_READY,
            f"job {rec.id} is {rec.state}; {what} once it has succeeded",
            extra={"state": rec.state},
        )
    result_dir = settings.result_dir(rec.id)
    if not results_complete(result_dir):
        raise Problem(ErrorCode.RESULTS_MISSING, f"the results of job {rec.id} are missing from the data dir")
    return result_dir


def geojson_file(path: Path, request: Request, headers: dict[str, str]) -> FileResponse:
    """The GeoJSON, gzip-encoded when the client accepts gzip (the worker wrote the copy)."""
    headers = {**headers, "Vary": "Accept-Encoding"}
    gz = path.with_name(path.name + GZIP_SUFFIX)
    if "gzip" in request.headers.get("accept-encoding", "").lower() and gz.is_file():
        headers["Content-Encoding"] = "gzip"
        path = gz
    return FileResponse(path, media_type=MEDIA_TYPES["geojson"], headers=headers)


def _result_path(settings: Settings, store: JobStore, job_id: str, name: str, who: Principal) -> Path:
    return published_results(settings, load_job(store, job_id, who)) / RESULT_FILES[name]


def _disposition(path: Path, job_id: str, *, attachment: bool) -> dict[str, str]:
    """Saved as ``<job id>-<file>``: a LIMS downloading many jobs' results keeps them apart."""
    kind = "attachment" if attachment else "inline"
    return {"Content-Disposition": f'{kind}; filename="{job_id}-{path.name}"'}


def _file(path: Path, name: str, job_id: str, *, attachment: bool) -> FileResponse:
    headers = _disposition(path, job_id, attachment=attachment)
    return FileResponse(path, media_type=MEDIA_TYPES[name], headers=headers)


@router.get(
    "/jobs/{job_id}/geojson",
    summary="QuPath-compatible GeoJSON (gzip with Accept-Encoding)",
    response_class=FileResponse,
    responses=_responses("geojson"),
)
def get_geojson(
    job_id: str, request: Request, who: ApiKey, settings: SettingsDep, store: StoreDep
) -> FileResponse:
    path = _result_path(settings, store, job_id, "geojson", who)
    return geojson_file(path, request, _disposition(path, job_id, attachment=True))


@router.get(
    "/jobs/{job_id}/stats",
    summary="Per-class areas in µm² (stats.json)",
    response_class=FileResponse,
    responses=_responses("stats"),
)
def get_stats(job_id: str, who: ApiKey, settings: SettingsDep, store: StoreDep) -> FileResponse:
    return _file(_result_path(settings, store, job_id, "stats", who), "stats", job_id, attachment=False)


@router.get(
    "/jobs/{job_id}/mask",
    summary="Label mask, pyramidal TIFF",
    response_class=FileResponse,
    responses=_responses("mask"),
)
def get_mask(job_id: str, who: ApiKey, settings: SettingsDep, store: StoreDep) -> FileResponse:
    return _file(_result_path(settings, store, job_id, "mask", who), "mask", job_id, attachment=True)


@router.get(
    "/jobs/{job_id}/overlay",
    summary="Thumbnail with classes drawn and a legend",
    response_class=FileResponse,
    responses=_responses("overlay"),
)
def get_overlay(job_id: str, who: ApiKey, settings: SettingsDep, store: StoreDep) -> FileResponse:
    return _file(_result_path(settings, store, job_id, "overlay", who), "overlay", job_id, attachment=False)


@router.get(
    "/jobs/{job_id}/provenance",
    summary="How the result was made (provenance.json)",
    response_class=FileResponse,
    responses=_responses("provenance"),
)
def get_provenance(job_id: str, who: ApiKey, settings: SettingsDep, store: StoreDep) -> FileResponse:
    return _file(
        _result_path(settings, store, job_id, "provenance", who), "provenance", job_id, attachment=False
    )


@router.get(
    "/jobs/{job_id}/seg.dcm",
    summary="DICOM Segmentation of a DICOM WSI input (segmentation.seg.dcm)",
    response_class=FileResponse,
    responses={
        **_responses("seg"),
        404: {
            "description": "no such job (or another tenant's), its results are gone, or the input was "
            "not a DICOM WSI (seg_not_available)"
        },
    },
)
def get_seg(job_id: str, who: ApiKey, settings: SettingsDep, store: StoreDep) -> FileResponse:
    rec = load_job(store, job_id, who)
    path = published_results(settings, rec) / OPTIONAL_RESULT_FILES["seg"]
    if not path.is_file():
        raise Problem(
            ErrorCode.SEG_NOT_AVAILABLE,
            f"job {rec.id} has no DICOM SEG: its input was {rec.upload_format or 'not DICOM'}, and a SEG is "
            "written for DICOM WSI input only",
        )
    return _file(path, "seg", job_id, attachment=True)


@router.get(
    "/jobs/{job_id}/qc",
    summary="Slide quality control: verdicts, values, thresholds, artefact areas (qc.json)",
    response_class=FileResponse,
    responses=_responses("qc"),
)
def get_qc(job_id: str, who: ApiKey, settings: SettingsDep, store: StoreDep) -> FileResponse:
    return _file(_result_path(settings, store, job_id, "qc", who), "qc", job_id, attachment=False)


@router.get(
    "/jobs/{job_id}/probabilities.ome.tiff",
    summary="Class probabilities: pyramidal OME-TIFF, one uint8 channel per class (outputs=probabilities)",
    response_class=FileResponse,
    responses={
        **_responses("probabilities"),
        404: {
            "description": "no such job (or another tenant's), its results are gone, or the request did "
            "not ask for outputs=probabilities (probabilities_not_requested)"
        },
    },
)
def get_probabilities(job_id: str, who: ApiKey, settings: SettingsDep, store: StoreDep) -> FileResponse:
    rec = load_job(store, job_id, who)
    path = published_results(settings, rec) / OPTIONAL_RESULT_FILES["probabilities"]
    if not path.is_file():
        raise Problem(
            ErrorCode.PROBABILITIES_NOT_REQUESTED,
            f"job {rec.id} has no probabilities.ome.tiff: it was submitted without outputs=probabilities",
        )
    return _file(path, "probabilities", job_id, attachment=True)
