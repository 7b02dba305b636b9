"""``/healthz`` (the process answers), ``/readyz`` (storage, broker, a worker), ``/metrics``."""

from __future__ import annotations

import os
import uuid
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from fprotoseg.app.auth import require_api_key
from fprotoseg.app.deps import DispatcherDep, SettingsDep, StoreDep
from fprotoseg.app.problems import problem_response
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.storage import free_mb

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the API process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _storage_ok(settings: SettingsDep) -> bool:
    probe = settings.data_dir / f".readyz-{uuid.uuid4().hex}"
    try:
        probe.write_bytes(b"ok")
        probe.unlink()
        return os.access(settings.uploads_dir, os.W_OK)
    except OSError:
        return False


def _free_mb(settings: SettingsDep) -> float | None:
    try:
        return round(free_mb(settings.data_dir), 1)
    except OSError:
        return None


@router.get(
    "/readyz",
    summary="Readiness: storage (writable, FPROTOSEG_MIN_FREE_MB free), job store, broker, a worker",
    responses={503: {"description": "not ready; `checks` says which part failed"}},
)
def readyz(settings: SettingsDep, store: StoreDep, dispatcher: DispatcherDep) -> JSONResponse:
    free = _free_mb(settings)
    enough_space = free is not None and free >= settings.min_free_mb
    checks: dict[str, Any] = {
        "mode": dispatcher.kind,
        "storage": _storage_ok(settings) and enough_space,
        "free_mb": free,
        "min_free_mb": settings.min_free_mb,
    }
    try:
        store.ping()
        checks["jobstore"] = True
    except JobStoreError:
        checks["jobstore"] = False
    checks["broker"] = dispatcher.broker_ok()
    workers = dispatcher.workers_alive() if checks["broker"] else 0
    checks["workers"] = workers
    ready = checks["storage"] and checks["jobstore"] and checks["broker"] and workers > 0
    if ready:
        return JSONResponse({"status": "ready", "checks": checks})
    failing = [k for k in ("storage", "jobstore", "broker") if not checks[k]] + (
        [] if workers else ["workers"]
    )
    if not enough_space:
        failing[failing.index("storage")] = (
            f"storage ({free} MiB free, FPROTOSEG_MIN_FREE_MB={settings.min_free_mb:g})"
        )
    return problem_response(
        ErrorCode.NOT_READY, "not ready: " + ", ".join(failing), extra={"checks": checks}
    )


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request, settings: SettingsDep) -> Response:
    if not settings.metrics_public:
        require_api_key(request, request.headers.get("X-API-Key"))
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
