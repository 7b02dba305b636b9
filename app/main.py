"""The FastAPI application: ``create_app(settings)`` wires settings, job store, dispatcher, routes.

The API never imports torch or OpenSlide: jobs reach workers by Celery task *name* (with a
broker) or through the SQLite job store (embedded default, see ``fprotoseg serve``).
Run it with ``fprotoseg serve``, or ``uvicorn --factory fprotoseg.app.main:create_app`` (settings from
the environment) behind a process manager.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from fprotoseg.app.dispatch import make_dispatcher
from fprotoseg.app.metrics import install_metrics
from fprotoseg.app.openapi import customise_openapi
from fprotoseg.app.problems import install_problem_handlers
from fprotoseg.app.routes import cohorts, health, jobs, models, results, segment, viewer
from fprotoseg.app.upload import TEMP_PREFIX
from fprotoseg.worker.service.cohorts import CohortSweeper
from fprotoseg.worker.service.cohortstore import open_cohort_store
from fprotoseg.worker.service.jobstore import JobStore, open_jobstore
from fprotoseg.worker.service.maintenance import run_maintenance
from fprotoseg.worker.service.settings import Settings, load_settings
from fprotoseg.worker.service.storage import prepare_data_dir

log = logging.getLogger("fprotoseg.api")

STALE_UPLOAD_S = 6 * 3600.0

DESCRIPTION = """Whole-slide H&E tissue segmentation (FProtoSeg).

`POST /segment` a slide (multipart field `file`), poll `GET /jobs/{id}` until `succeeded`, then
fetch `/geojson` (QuPath), `/stats` (µm² per class), `/mask`, `/overlay`, `/provenance`.
Every endpoint but `/healthz`, `/readyz`, `/metrics` and the docs needs an `X-API-Key` header;
a key belongs to a tenant, which sees only its own jobs (another tenant's job is a 404).
Errors are `application/problem+json` with a stable `code`.
"""


def _remove_stale_uploads(settings: Settings) -> None:
    """Temp files of uploads cut off by a crash; any younger one may belong to a live request."""
    now = time.time()
    for path in settings.uploads_dir.glob(f"{TEMP_PREFIX}*"):
        try:
            if now - path.stat().st_mtime > STALE_UPLOAD_S:
                if path.is_dir():  # an unpacked DICOM zip
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink()
        except OSError:
            pass


class Maintenance:
    """A daemon thread running :func:`run_maintenance` (lost jobs, retention) while the API is up."""

    def __init__(self, settings: Settings, store: JobStore, resubmit: Any) -> None:
        self.settings, self.store, self.resubmit = settings, store, resubmit
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maintenance", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.maintenance_interval_s):
            try:
                run_maintenance(self.store, self.settings, self.resubmit)
            except Exception:  # never let housekeeping take the API down
                log.exception("maintenance pass failed")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


_SECRET_QUERY_NAMES = ("token", "sig", "key", "secret", "credential", "auth", "password")


class RedactSecretsInAccessLog(logging.Filter):
    """The access log keeps the path and the names of query parameters, never the value of one
    that may be a secret (the viewer's ``?token=``, a signed URL's signature): log files are read
    and shipped by more people than may open a patient's results."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            path, query = args[2].split("?", 1)
            parts = []
            for pair in query.split("&"):
                name = pair.split("=", 1)[0]
                secret = any(word in name.lower() for word in _SECRET_QUERY_NAMES)
                parts.append(f"{name}=REDACTED" if secret and "=" in pair else pair)
            record.args = (*args[:2], f"{path}?{'&'.join(parts)}", *args[3:])
        return True


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: from the FPROTOSEG_* environment).

    Raises ConfigurationError (one line) when the data dir cannot be written.
    """
    from importlib.metadata import PackageNotFoundError, version

    settings = settings or load_settings()
    prepare_data_dir(settings.data_dir, (settings.uploads_dir, settings.jobs_dir))
    _remove_stale_uploads(settings)
    store = open_jobstore(settings)
    dispatcher = make_dispatcher(settings, store)
    if not settings.auth_disabled and not settings.api_keys:
        log.warning("no API key configured (FPROTOSEG_API_KEYS): every authenticated request gets 401")
    try:
        app_version = version("fprotoseg")
    except PackageNotFoundError:
        app_version = "0+unknown"

    maintenance = Maintenance(settings, store, dispatcher.resubmit)
    cohort_store = open_cohort_store(store)
    # ends cohorts whose jobs have all ended and sends their one callback
    sweeper = CohortSweeper(settings, cohort_store, store)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        maintenance.start()
        sweeper.start()
        try:
            yield
        finally:
            sweeper.stop()
            maintenance.stop()

    app = FastAPI(title="fprotoseg", version=app_version, description=DESCRIPTION, lifespan=lifespan)
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSecretsInAccessLog) for f in access_log.filters):
        access_log.addFilter(RedactSecretsInAccessLog())
    app.state.settings = settings
    app.state.key_entries = settings.key_entries()
    app.state.store = store
    app.state.cohorts = cohort_store
    app.state.dispatcher = dispatcher
    install_problem_handlers(app)
    app.state.metrics_registry = install_metrics(app, store, dispatcher)
    for module in (segment, cohorts, jobs, results, viewer, models, health):
        app.include_router(module.router)
    # the result viewer's scripts (OpenSeadragon with its licence, the page's own): no CDN at run time
    app.mount("/static", StaticFiles(directory=viewer.STATIC_DIR), name="static")
    customise_openapi(app)
    return app
