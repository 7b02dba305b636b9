"""Housekeeping the API runs every FPROTOSEG_MAINTENANCE_INTERVAL_S: lost jobs and retention.

**Lost jobs.** A running job writes a heartbeat (``lifecycle.JobHeartbeat``). When it stops for
FPROTOSEG_JOB_HEARTBEAT_TIMEOUT_S (worker killed, broker or job store lost, disk full), the job
cannot finish by itself: it is requeued and handed to the workers again, or, after
FPROTOSEG_MAX_DELIVERY_ATTEMPTS, failed with ``worker_lost``; a lost job the client asked to cancel
is cancelled. Minutes, not the hours of a broker's visibility timeout. Every change is a
compare-and-set on "still the same attempt, still silent", so a worker that comes back wins.

**Retention.** With FPROTOSEG_RETENTION_DAYS > 0, finished jobs older than that lose their upload,
results and record; what was reclaimed is counted in the durable metrics
(``retention_jobs_deleted``, ``retention_bytes_reclaimed``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.lifecycle import cancel_job, fail_job, job_is_lost
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import QUEUED, RUNNING

log = logging.getLogger(__name__)

Resubmit = Callable[[str], None]
REQUEUED_STAGE = "requeued: its worker stopped answering"


def end_lost_job(
    store: JobStore, settings: Settings, rec: JobRecord, resubmit: Resubmit | None, now: float | None = None
) -> JobRecord | None:
    """Requeue, fail or cancel one running job whose heartbeat stopped; None if it came back."""
    attempt = rec.attempts

    def still_lost(r: JobRecord) -> bool:
        return r.attempts == attempt and job_is_lost(r, settings, now)

    if rec.cancel_requested:
        out = cancel_job(store, settings, rec.id, where=still_lost)
    elif rec.attempts >= settings.max_delivery_attempts:
        out = fail_job(
            store,
            settings,
            rec.id,
            ErrorCode.WORKER_LOST,
            f"the job's worker stopped answering {rec.attempts} times (worker killed, broker or job "
            "store lost, or disk full); upload the slide again",
            where=still_lost,
        )
    else:
        out = store.transition(
            rec.id, QUEUED, [RUNNING], still_lost, stage=REQUEUED_STAGE, progress=0.0, heartbeat_at=None
        )
        if out is not None:
            log.warning("job %s: no heartbeat from attempt %d; requeued", rec.id, attempt)
            _resubmit(rec.id, resubmit)
    if out is not None and out.state != QUEUED:
        log.warning("job %s: no heartbeat from attempt %d; %s", rec.id, attempt, out.state)
    return out


def _resubmit(job_id: str, resubmit: Resubmit | None) -> None:
    if resubmit is None:
        return  # the embedded worker takes queued jobs from the store itself
    try:
        resubmit(job_id)
    except Exception as exc:  # the broker is down too: the next pass tries again
        log.warning("job %s: could not be handed to the workers again: %s", job_id, exc)


def reap_lost_jobs(
    store: JobStore, settings: Settings, resubmit: Resubmit | None, now: float | None = None
) -> int:
    """One pass over running jobs (and requeued ones the broker may not have); returns jobs acted on."""
    now = time.time() if now is None else now
    acted = 0
    for job_id in store.ids_in_state(RUNNING):
        rec = store.get(job_id)
        if rec is not None and job_is_lost(rec, settings, now):
            acted += end_lost_job(store, settings, rec, resubmit, now) is not None
    if resubmit is not None:  # a requeue whose resubmission failed (broker down) is sent again
        for job_id in store.ids_in_state(QUEUED):
            rec = store.get(job_id)
            if (
                rec is not None
                and rec.stage == REQUEUED_STAGE
                and now - rec.updated_at > settings.job_heartbeat_timeout_s
                and store.update(job_id, QUEUED, stage=REQUEUED_STAGE)  # stamps updated_at
            ):
                _resubmit(job_id, resubmit)
                acted += 1
    return acted


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):  # a file removed meanwhile counts nothing
                total += (Path(root) / name).stat().st_size
    return total


def apply_retention(store: JobStore, settings: Settings, now: float | None = None) -> tuple[int, int]:
    """Delete finished jobs past FPROTOSEG_RETENTION_DAYS; (jobs deleted, bytes reclaimed)."""
    if settings.retention_days <= 0:
        return 0, 0
    now = time.time() if now is None else now
    cutoff = now - settings.retention_days * 86400.0
    jobs = reclaimed = 0
    for rec in store.finished_before(cutoff):
        targets = [settings.jobs_dir / rec.id]
        owned = settings.owned_upload(rec.upload_path)  # never a slide referenced by path
        if owned is not None:
            targets.append(owned)
        for path in targets:
            if path.exists():
                reclaimed += _tree_bytes(path)
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        store.delete(rec.id)
        jobs += 1
    if jobs:
        store.incr_metrics({"retention_jobs_deleted": jobs, "retention_bytes_reclaimed": reclaimed})
        log.info("retention: deleted %d finished job(s), reclaimed %d bytes", jobs, reclaimed)
    return jobs, reclaimed


def run_maintenance(store: JobStore, settings: Settings, resubmit: Resubmit | None) -> None:
    """One pass of everything above; a job store outage is logged and tried again next pass."""
    try:
        reap_lost_jobs(store, settings, resubmit)
        apply_retention(store, settings)
    except JobStoreError as exc:
        log.warning("maintenance skipped: %s", exc.message)
