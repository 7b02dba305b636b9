"""Result files of a succeeded job: ``/geojson`` (gzip when asked), ``/stats``, ``/mask``,
``/overlay``, ``/provenance``, ``/qc``, ``/seg.dcm`` where the input was a DICOM WSI, and
``/probabilities.ome.tiff`` where the request asked for it. Served straight from the job's
published results directory.

The plain downloads are one table (:data:`DOWNLOADS`) and one route body (:func:`_download_route`):
what differs between them (file, summary, inline or attachment, the JSON model documenting it) is
data, so the rule "a succeeded job's file, with its media type, saved as ``<job id>-<file>``" is
written once. ``/geojson`` (gzip negotiation) and the optional files (``/seg.dcm``,
``/probabilities.ome.tiff``: :func:`_optional_file`) add their own step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse
from pydantic import BaseModel

from fprotoseg.app.auth import ApiKey, Principal
from fprotoseg.app.deps import SettingsDep, StoreDep
from fprotoseg.app.errors import Problem
from fprotoseg.app.routes.jobs import load_job
from fprotoseg.app.routes.result_models import FeatureCollectionView, ProvenanceView, StatsView
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

# Every binary download is also offered as this, to a client that asks for it (Accept): the one
# binary media type client generators know, so a generated client keeps the download as bytes.
OCTET_STREAM = "application/octet-stream"

# the JSON files whose shape the schema spells out (a generated client gets typed objects)
RESULT_MODELS: dict[str, type[BaseModel]] = {
    "geojson": FeatureCollectionView,
    "stats": StatsView,
    "provenance": ProvenanceView,
}


def _responses(name: str) -> dict[int | str, dict[str, Any]]:
    """The file's own media type for 200 (not FastAPI's default application/json), and the errors.

    A JSON file's schema is its model from :data:`RESULT_MODELS` (app/openapi.py puts the models in
    the document's components), any other JSON an object; every other file is a binary string in
    its own media type and in :data:`OCTET_STREAM`, which a client generator turns into bytes."""
    media = MEDIA_TYPES[name]
    model = RESULT_MODELS.get(name)
    content: dict[str, Any]
    if model is not None:
        content = {media: {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
    elif _is_json(media):
        content = {media: {"schema": {"type": "object", "additionalProperties": True}}}
    else:
        binary = {"schema": {"type": "string", "format": "binary"}}
        content = {media: binary, OCTET_STREAM: binary}
    return {
        200: {"description": RESULT_FILES.get(name) or OPTIONAL_RESULT_FILES[name], "content": content},
        404: {"description": "no such job (or another tenant's), or its results are gone"},
        409: {"description": "the job has not succeeded (yet)"},
    }


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _media_type(name: str, request: Request) -> str:
    """The file's own media type, or :data:`OCTET_STREAM` for a binary file when the client's
    Accept names that and not the file's own type."""
    media = MEDIA_TYPES[name]
    accept = request.headers.get("accept", "").lower()
    if not _is_json(media) and OCTET_STREAM in accept and media not in accept:
        return OCTET_STREAM
    return media


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


def _file(path: Path, name: str, job_id: str, request: Request, *, attachment: bool) -> FileResponse:
    headers = _disposition(path, job_id, attachment=attachment)
    return FileResponse(path, media_type=_media_type(name, request), headers=headers)


@dataclass(frozen=True)
class Download:
    """One plain result download: ``GET /jobs/{job_id}/<name>``, operation ``get_<name>``."""

    name: str  # a key of RESULT_FILES
    summary: str
    attachment: bool  # saved by a browser (binary files) rather than shown inline


DOWNLOADS: tuple[Download, ...] = (
    Download("stats", "Per-class areas in µm² (stats.json)", attachment=False),
    Download("mask", "Label mask, pyramidal TIFF", attachment=True),
    Download("overlay", "Thumbnail with classes drawn and a legend", attachment=False),
    Download("provenance", "How the result was made (provenance.json)", attachment=False),
    Download(
        "qc",
        "Slide quality control: verdicts, values, thresholds, artefact areas (qc.json)",
        attachment=False,
    ),
)


def _download_route(download: Download) -> Callable[..., FileResponse]:
    """The route function of one plain download (the body every one of them shares)."""

    def route(
        job_id: str, request: Request, who: ApiKey, settings: SettingsDep, store: StoreDep
    ) -> FileResponse:
        path = _result_path(settings, store, job_id, download.name, who)
        return _file(path, download.name, job_id, request, attachment=download.attachment)

    route.__name__ = route.__qualname__ = f"get_{download.name}"
    return route


for _download in DOWNLOADS:
    router.add_api_route(
        f"/jobs/{{job_id}}/{_download.name}",
        _download_route(_download),
        methods=["GET"],
        summary=_download.summary,
        response_class=FileResponse,
        responses=_responses(_download.name),
    )


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
def get_seg(
    job_id: str, request: Request, who: ApiKey, settings: SettingsDep, store: StoreDep
) -> FileResponse:
    rec = load_job(store, job_id, who)
    why = (
        f"job {rec.id} has no DICOM SEG: its input was {rec.upload_format or 'not DICOM'}, and a SEG is "
        "written for DICOM WSI input only"
    )
    return _optional_file(settings, rec, "seg", request, ErrorCode.SEG_NOT_AVAILABLE, why)


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
def get_probabilities(
    job_id: str, request: Request, who: ApiKey, settings: SettingsDep, store: StoreDep
) -> FileResponse:
    rec = load_job(store, job_id, who)
    why = f"job {rec.id} has no probabilities.ome.tiff: it was submitted without outputs=probabilities"
    return _optional_file(settings, rec, "probabilities", request, ErrorCode.PROBABILITIES_NOT_REQUESTED, why)


def _optional_file(
    settings: Settings, rec: JobRecord, name: str, request: Request, missing: ErrorCode, why: str
) -> FileResponse:
    """A result file only some jobs have: the file, or ``404 <missing>`` saying why it is absent."""
    path = published_results(settings, rec) / OPTIONAL_RESULT_FILES[name]
    if not path.is_file():
        raise Problem(missing, why)
    return _file(path, name, rec.id, request, attachment=True)
