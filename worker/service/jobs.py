"""``process_job``: the one job function, shared by the Celery task and the embedded executor.

Orchestration only: claim, run the pipeline (progress and stop checks: ``runtime``), publish
(``result_files``), end the job and call back (``callbacks``). Idempotent, because Redis redelivers
a job whose worker died (acks_late): a finished job is left alone, one whose results are on disk is
marked succeeded without redoing the work, and every state change is a compare-and-set, so a job
ends ``succeeded`` exactly once even when two deliveries race. Cheap to import (no torch).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import (
    JobCancelledError,
    JobInterrupted,
    JobStoreError,
    TransientJobError,
    UploadChangedError,
)
from fprotoseg.worker.service.client_view import client_message, describe_results_for_client, render_viewer
from fprotoseg.worker.service.jobstore import JobRecord, JobStore, open_jobstore
from fprotoseg.worker.service.lifecycle import JobHeartbeat, _finish, cancel_job, fail_job, job_is_lost
from fprotoseg.worker.service.runtime import JobProgress, StopCheck
from fprotoseg.worker.service.segmenters import get_segmenter
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import PUBLISHING_STAGE, QUEUED, RUNNING, SUCCEEDED
from fprotoseg.worker.service.storage import is_out_of_space
from fprotoseg.worker.wsi.result_files import STATS_NAME, publish, results_complete

if TYPE_CHECKING:
    from fprotoseg.worker.wsi.pipeline import RunResult

__all__ = ["cancel_job", "fail_job", "job_is_lost", "process_job"]

log = logging.getLogger(__name__)
StopFlag = Callable[[], bool] | None


def process_job(
    job_id: str,
    settings: Settings,
    store: JobStore | None = None,
    *,
    should_stop: StopFlag = None,
) -> JobRecord | None:
    """Run one job to a terminal state (or back to ``queued`` when the worker shuts down).

    Raises TransientJobError only for failures worth a retry (job store unreachable).
    """
    own_store = store is None
    store = store or open_jobstore(settings)
    try:
        return _process(job_id, settings, store, should_stop)
    except JobStoreError as exc:
        raise TransientJobError(f"job {job_id}: {exc.message}") from None
    finally:
        if own_store:
            store.close()


def _claim(store: JobStore, settings: Settings, job_id: str) -> JobRecord | None:
    """The job, moved to ``running`` for this delivery; None when it is final or was just ended here."""
    rec = store.get(job_id)
    if rec is None:
        log.warning("job %s: no such job record; message dropped", job_id)
        return None
    if rec.terminal:
        log.info("job %s: already %s; redelivery ignored", job_id, rec.state)
        return None
    if results_complete(settings.result_dir(job_id)):  # redelivered after the results were published
        qc = _published_qc(settings.result_dir(job_id))
        _finish(store, settings, job_id, SUCCEEDED, progress=1.0, stage="done", qc=qc)
        return None
    if rec.cancel_requested:
        cancel_job(store, settings, job_id)
        return None
    if rec.attempts >= settings.max_delivery_attempts:
        fail_job(
            store, settings, job_id, ErrorCode.WORKER_LOST,
            f"the worker processing this job stopped {rec.attempts} times (out of memory or killed); "
            "check the worker logs and the slide",
        )
        return None
    if rec.state == RUNNING and not job_is_lost(rec, settings):
        log.info("job %s: attempt %d is alive elsewhere; duplicate delivery ignored", job_id, rec.attempts)
        return None
    return store.transition(
        job_id, RUNNING, [QUEUED, RUNNING],
        lambda r: r.state == QUEUED or job_is_lost(r, settings),
        attempts=rec.attempts + 1,
        started_at=rec.started_at or time.time(), stage="loading model", progress=0.0,
        heartbeat_at=time.time(),
    )


def _published_qc(result_dir: Path) -> dict[str, object] | None:
    """The QC summary of published results (for a redelivery that finds them on disk)."""
    try:
        qc = json.loads((result_dir / STATS_NAME).read_text()).get("qc")
    except (OSError, ValueError):
        return None
    return qc if isinstance(qc, dict) else None


def _process(job_id: str, settings: Settings, store: JobStore, should_stop: StopFlag) -> JobRecord | None:
    rec = _claim(store, settings, job_id)
    if rec is None:  # nothing (more) to do here, or cancelled between the read and the claim
        return store.get(job_id)
    log.info("job %s: running (attempt %d)", job_id, rec.attempts)
    started_s = time.monotonic()
    work_dir = settings.jobs_dir / job_id / f"work-{rec.attempts}-{os.getpid()}"
    try:
        with JobHeartbeat(store, job_id, rec.attempts, settings.job_heartbeat_interval_s):
            result = _run_pipeline(store, settings, rec, work_dir, should_stop)
            store.progress(job_id, "rendering viewer", 0.98)
            render_viewer(settings, rec, work_dir)
        describe_results_for_client(work_dir, rec, settings)
        _enter_publishing(store, job_id)
        result_dir = settings.result_dir(job_id)
        publish(work_dir, result_dir)
        for stale in result_dir.parent.glob("work-*"):  # partial output of attempts whose worker died
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        return _failed(store, settings, rec, exc)
    duration_s = round(time.monotonic() - started_s, 3)
    return _finish(  # from running only: not after a cancel or a racing delivery that finished first
        store, settings, job_id, SUCCEEDED, only_from=RUNNING, progress=1.0, stage="done",
        duration_s=duration_s, tiles=result.tiles_inferred, qc=result.stats.get("qc"),
    )


def _fail_disk_full(store: JobStore, settings: Settings, job_id: str) -> JobRecord | None:
    """``disk_full``, written while the heartbeat timeout allows. The work dir is gone by now and
    each write the store refused gave back its write-ahead log, so a later try finds room; only
    if none does is the JobStoreError left to the reaper."""
    deadline = time.monotonic() + settings.job_heartbeat_timeout_s / 2
    while True:
        try:
            return fail_job(
                store, settings, job_id, ErrorCode.DISK_FULL,
                "the server ran out of disk space while processing the slide; upload it again later",
            )
        except JobStoreError as exc:
            if time.monotonic() >= deadline:
                raise
            log.warning("job %s: failure not recorded yet (%s); trying again", job_id, exc.message)
            time.sleep(settings.job_heartbeat_interval_s / 4)


def _enter_publishing(store: JobStore, job_id: str) -> None:
    """The point of no return. The batch loop sees a cancel only between batches, so a one-batch
    job was past its last check at once; here a cancel requested at any time before is honoured
    (JobCancelledError), in the same compare-and-set that makes DELETE answer ``cancellable:
    false`` from now on, so the answer and the outcome always agree."""
    entered = store.transition(
        job_id, RUNNING, [RUNNING], lambda r: not r.cancel_requested,
        stage=PUBLISHING_STAGE, progress=0.99, heartbeat_at=time.time(),
    )
    if entered is None and store.is_cancel_requested(job_id):
        raise JobCancelledError("the job was cancelled")


def _run_pipeline(
    store: JobStore, settings: Settings, rec: JobRecord, work_dir: Path, should_stop: StopFlag
) -> RunResult:
    segmenter = get_segmenter(settings, rec.model)
    from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
    from fprotoseg.worker.wsi.roi import parse_roi

    slide = settings.upload_file(rec.upload_path)
    # a file must still have the size received (a DICOM series folder was hashed as a whole)
    if rec.upload_bytes and slide.is_file() and slide.stat().st_size != rec.upload_bytes:
        raise UploadChangedError(
            f"the stored upload has {slide.stat().st_size} bytes, not the {rec.upload_bytes} received; "
            "upload the slide again"
        )
    # The gzip copy lets the API answer Accept-Encoding: gzip without recompressing per request.
    options = PipelineOptions(
        geojson_gzip=True,
        batch_size=settings.batch_size,  # None: the segmenter chooses (PipelineOptions)
        reader_threads=settings.pipeline_threads,
        qc_policy=rec.qc_policy or settings.qc_policy,
        write_probabilities=rec.outputs == "probabilities",
    )
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    return run(
        slide,
        work_dir,
        segmenter,
        options=options,
        mpp_override=rec.mpp,
        progress=JobProgress(store, rec.id, settings.progress_interval_s),
        should_cancel=StopCheck(
            store, rec.id, settings.cancel_poll_interval_s, should_stop, settings.job_soft_time_limit_s
        ),
        slide_sha256=rec.upload_sha256 or None,  # hashed once, while the upload streamed in
        roi=parse_roi(rec.roi) if rec.roi is not None else None,
    )


def _failed(store: JobStore, settings: Settings, rec: JobRecord, exc: BaseException) -> JobRecord | None:
    """Where a job that did not succeed ends: back in the queue, cancelled, or failed with a code."""
    job_id = rec.id
    if isinstance(exc, JobInterrupted):
        store.transition(job_id, QUEUED, [RUNNING], attempts=rec.attempts - 1, stage="requeued", progress=0.0)
        log.info("job %s: interrupted by shutdown, requeued", job_id)
        return store.get(job_id)
    if isinstance(exc, JobCancelledError):
        return cancel_job(store, settings, job_id)
    if isinstance(exc, Exception) and is_out_of_space(exc):  # the job store's own writes too
        log.error("job %s: out of disk space: %s", job_id, exc)
        return _fail_disk_full(store, settings, job_id)
    if isinstance(exc, JobStoreError) or not isinstance(exc, Exception):
        raise exc  # transient (retried by process_job's caller), or KeyboardInterrupt/SystemExit
    if isinstance(exc, FprotosegError):
        return fail_job(store, settings, job_id, exc.code, client_message(rec, exc, settings))
    if isinstance(exc, MemoryError):
        return fail_job(
            store, settings, job_id, ErrorCode.OUT_OF_MEMORY, "the worker ran out of memory on the slide"
        )
    if type(exc).__name__ == "SoftTimeLimitExceeded":  # Celery's, matched by name (no import)
        limit_s = settings.job_soft_time_limit_s
        return fail_job(
            store, settings, job_id, ErrorCode.TIME_LIMIT,
            f"the job ran longer than FPROTOSEG_JOB_SOFT_TIME_LIMIT_S={limit_s:g} s",
        )
    log.exception("job %s: unexpected error", job_id, exc_info=exc)
    return fail_job(
        store, settings, job_id, ErrorCode.INTERNAL_ERROR,
        f"internal error ({type(exc).__name__}) while processing the slide; the worker log has details",
    )
