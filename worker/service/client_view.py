"""What a client reads of its job: its own file name, metadata and fixes, never the server's.

Why a module of its own: the slide pipeline writes results and errors for whoever ran it (the CLI
names ``--mpp`` and the file it read); the service stores an upload under its own name in its
data dir. Before results and errors reach an HTTP client they are described for it here, in one
place, so no server path leaks and a LIMS can match every file to its case.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from fprotoseg.model.catalog import default_model_name
from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.errors import SlideError
from fprotoseg.worker.service.jobstore import JobRecord
from fprotoseg.worker.service.settings import Settings

log = logging.getLogger("fprotoseg.worker.service.jobs")


def _scrub(value: Any, secrets_: tuple[str, ...]) -> Any:
    """``value`` with every string naming a server path (the data dir) cut to its last part."""
    if isinstance(value, dict):
        return {k: _scrub(v, secrets_) for k, v in value.items()}
    if isinstance(value, list):
        return [_scrub(v, secrets_) for v in value]
    if isinstance(value, str) and any(s in value for s in secrets_):
        return value.rsplit("/", 1)[-1]
    return value


def describe_results_for_client(work_dir: Path, rec: JobRecord, settings: Settings) -> None:
    """Make ``stats.json`` and ``provenance.json`` speak of the client's slide, not the server's.

    The pipeline names the file it read (``<job id>.svs`` under the data dir); a LIMS knows its
    own file name, metadata and Idempotency-Key. Both files get a ``job`` block with those, the
    slide's ``file`` becomes the client's name, and no server path is left anywhere in them.
    """
    job = {
        "job_id": rec.id,
        "filename": rec.filename,
        "metadata": rec.metadata,
        "idempotency_key": rec.idempotency_key,
        "upload_sha256": rec.upload_sha256,
        "slide_uri": rec.slide_uri,  # file:// or s3:// when named instead of uploaded
        "model": rec.model or default_model_name(settings.checkpoint),  # the name GET /jobs/{id} shows
    }
    server_names = _server_folders(settings, rec)
    for name in ("stats.json", "provenance.json"):
        path = work_dir / name
        if not path.is_file():
            continue
        doc = json.loads(path.read_text())
        slide = doc.get("slide")
        if isinstance(slide, dict):
            slide.pop("path", None)
            slide["file"] = rec.filename
        doc["job"] = job
        doc = _scrub(doc, server_names)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
        os.replace(tmp, path)


def client_message(rec: JobRecord, exc: FprotosegError, settings: Settings) -> str:
    """A job error as the HTTP client that submitted the job should read it.

    Errors of the slide pipeline name the file they read (the server's ``<job id>.svs``) and word
    their fix for the CLI (``--mpp``); here the file is the client's, the fix is worded for the API
    from the error's ``hint``, and no server folder is named.
    """
    if isinstance(exc, SlideError) and exc.hint is not None:
        message = f"{exc.summary}; {exc.hint.for_http()}"
    else:
        message = exc.message
    label = repr(rec.filename) if rec.filename else "the uploaded slide"
    for server_name in (rec.upload_path, Path(rec.upload_path).name):
        if server_name:
            message = message.replace(server_name, label)
    for folder in _server_folders(settings, rec):
        message = message.replace(folder, "<server path>")
    return message


def _server_folders(settings: Settings, rec: JobRecord) -> tuple[str, ...]:
    """The server's own paths a message or result file may name: the data dir and the upload."""
    return tuple(
        s
        for s in {str(settings.data_dir), str(settings.data_dir.resolve()), rec.upload_path}
        if s and s not in (".", "")
    )


def render_viewer(settings: Settings, rec: JobRecord, work_dir: Path) -> None:
    """The result viewer's Deep Zoom pyramids, published with the other files (the API cannot
    render them: it has no OpenSlide). Rendered after the pipeline from its own result files."""
    from fprotoseg.worker.wsi.deepzoom import write_viewer

    manifest = write_viewer(work_dir, settings.upload_file(rec.upload_path), mpp_override=rec.mpp)
    log.info("job %s: viewer rendered (%s)", rec.id, manifest.parent.name)
