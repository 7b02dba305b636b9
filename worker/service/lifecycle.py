"""How a job ends, and when it counts as lost: shared by the job service, the API and the reaper.

Cheap to import (no pipeline, no model): the API imports it to end a job whose worker is gone
(``DELETE`` of a stuck job, a replay of a dead one) without importing the job runner.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.callbacks import enqueue
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobState

__all__ = ["cancel_job", "fail_job", "job_is_lost"]

log = logging.getLogger("fprotoseg.worker.service.jobs")


def _finish(
    store: JobStore,
    settings: Settings,
    job_id: str,
    state: JobState,
    *,
    only_from: str = "",
    where: Callable[[JobRecord], bool] | None = None,
    **changes: Any,
) -> JobRecord | None:
    """Terminal compare-and-set; only the delivery that wins it deletes the upload (if asked) and
    queues the callback."""
    from_states = [only_from] if only_from else [QUEUED, RUNNING]
    current = store.get(job_id)
    if current is not None and current.callback_url:
        changes["callback_status"] = "pending"
    rec = store.transition(job_id, state, from_states, where, finished_at=time.time(), **changes)
    if rec is None:
        return store.get(job_id)
    if state != SUCCEEDED:  # a job without results never answers a replay: the key may start anew
        with contextlib.suppress(JobStoreError):
            store.release_idempotency_key(job_id)
    owned = settings.owned_upload(rec.upload_path)  # never a slide referenced by path
    if not settings.keep_uploads and owned is not None:  # FPROTOSEG_KEEP_UPLOADS=false: results stay
        with contextlib.suppress(OSError):
            if owned.is_dir():  # the unpacked folder of a DICOM WSI zip
                shutil.rmtree(owned, ignore_errors=True)
            else:
                owned.unlink(missing_ok=True)
    error = f" ({rec.error_code}: {rec.error_message})" if rec.error_code else ""
    log.info("job %s: %s%s", job_id, state, error)
    if state == SUCCEEDED and rec.duration_s is not None:
        with contextlib.suppress(JobStoreError):
            store.record_finished_job(rec.duration_s, rec.tiles)
    enqueue(store, rec)
    return rec


def fail_job(
    store: JobStore,
    settings: Settings,
    job_id: str,
    code: str,
    message: str,
    *,
    where: Callable[[JobRecord], bool] | None = None,
) -> JobRecord | None:
    """Mark a queued/running job failed (once) and queue its callback."""
    return _finish(
        store, settings, job_id, FAILED, where=where, stage="failed", error_code=code, error_message=message
    )


def cancel_job(
    store: JobStore, settings: Settings, job_id: str, *, where: Callable[[JobRecord], bool] | None = None
) -> JobRecord | None:
    """Mark a queued/running job cancelled (once) and queue its callback."""
    return _finish(store, settings, job_id, CANCELLED, where=where, stage="cancelled", cancel_requested=True)


def job_is_lost(rec: JobRecord, settings: Settings, now: float | None = None) -> bool:
    """Whether the job is lost with its worker: running, and its attempt not heard of (no
    heartbeat, progress or start) for FPROTOSEG_JOB_HEARTBEAT_TIMEOUT_S. A lost job is requeued,
    failed ``worker_lost`` or cancelled by :func:`~fprotoseg.worker.service.maintenance.end_lost_job`."""
    if rec.state != RUNNING:
        return False
    last = rec.heartbeat_at or rec.started_at or rec.updated_at
    return (time.time() if now is None else now) - last > settings.job_heartbeat_timeout_s


class JobHeartbeat:
    """A thread that stamps the running attempt's ``heartbeat_at`` every ``interval_s``.

    Progress writes stop during long single stages (vectorising a large slide) and never happen
    when the pipeline is stuck; the heartbeat says "this attempt's process is alive and reaches the
    job store", which is what the reaper (:mod:`fprotoseg.worker.service.maintenance`) judges.
    """

    def __init__(self, store: JobStore, job_id: str, attempt: int, interval_s: float) -> None:
        self.store, self.job_id, self.attempt, self.interval_s = store, job_id, attempt, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id[:8]}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.store.job_heartbeat(self.job_id, self.attempt):
                    return  # requeued or ended elsewhere: nothing to vouch for any more
            except JobStoreError as exc:
                log.warning("job %s: heartbeat not written: %s", self.job_id, exc.message)

    def __enter__(self) -> JobHeartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5.0)
