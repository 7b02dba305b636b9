"""``process_job``: the one job function, shared by the Celery task and the embedded executor.

It is idempotent, because Redis redelivers a job whose worker died (acks_late): a job already
finished is left alone, a job whose results are complete on disk is marked succeeded without
redoing the work, and the results directory is published by one atomic rename, so readers see
either all result files or none. Every state change is a compare-and-set in the job store, so a
job ends ``succeeded`` exactly once even when two deliveries race.

Importing this module is cheap: the pipeline (OpenSlide, torch) is imported inside the function.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from model.errors import FprotosegError
from worker.callbacks import send_callback
from worker.errors import JobCancelledError
from worker.jobstore import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    JobRecord,
    JobStore,
    JobStoreError,
    open_jobstore,
)
from worker.settings import Settings

log = logging.getLogger(__name__)

RESULT_FILES = {
    "geojson": "segmentation.geojson",
    "stats": "stats.json",
    "mask": "mask.tiff",
    "overlay": "overlay.png",
    "provenance": "provenance.json",
}
COMPLETE_MARKER = ".complete.json"


class TransientJobError(FprotosegError):
    """A failure worth retrying (the job store or broker blinked); the job stays queued."""

    code = "transient_error"


class JobInterrupted(FprotosegError):
    """The worker is shutting down; the job goes back to the queue to be resumed."""

    code = "interrupted"


def results_complete(result_dir: Path) -> bool:
    """True when every result file is published (the marker is written last, before the rename)."""
    return (result_dir / COMPLETE_MARKER).is_file() and all(
        (result_dir / n).is_file() for n in RESULT_FILES.values()
    )


def upload_path(settings: Settings, rec: JobRecord) -> Path:
    """The job's slide; records hold paths relative to the data dir (shared volume)."""
    path = Path(rec.upload_path)
    return path if path.is_absolute() else settings.data_dir / path


def resolve_precision(settings: Settings) -> tuple[str, str]:
    """(device, precision) with ``auto`` resolved: fp16 on a GPU, fp32 on a CPU."""
    from model.segmenter import resolve_device

    device = resolve_device(settings.device)
    precision = settings.precision
    if precision == "auto":
        precision = "fp16" if device == "cuda" else "fp32"
    return device, precision


@functools.lru_cache(maxsize=2)
def _load_segmenter_cached(checkpoint: str | None, device: str, precision: str) -> Any:
    from model import load_segmenter

    log.info("loading model %s on %s/%s", checkpoint or "(packaged default)", device, precision)
    return load_segmenter(checkpoint, device=device, precision=precision)


def get_segmenter(settings: Settings) -> Any:
    """The segmenter of this process, loaded once (per process) and reused by every job."""
    device, precision = resolve_precision(settings)
    checkpoint = str(settings.checkpoint) if settings.checkpoint else None
    return _load_segmenter_cached(checkpoint, device, precision)


class _Progress:
    """Maps the pipeline's (stage, done, total) onto one monotone 0..1, written at a bounded rate."""

    def __init__(self, store: JobStore, job_id: str, interval_s: float) -> None:
        self.store, self.job_id, self.interval_s = store, job_id, interval_s
        self.value = 0.0
        self.stage = ""
        self._last_write = 0.0
        self._seen_inference = False

    def __call__(self, stage: str, done: int, total: int) -> None:
        frac = (done / total) if total else 1.0
        frac = max(0.0, min(1.0, frac))
        name = stage.lower()
        if "infer" in name:
            self._seen_inference = True
            value = 0.05 + 0.85 * frac  # inference dominates the time of a job
        elif self._seen_inference:
            value = 0.90 + 0.09 * frac
        else:
            value = 0.05 * frac
        self.value = max(self.value, min(value, 0.99))
        now = time.monotonic()
        if stage != self.stage or now - self._last_write >= self.interval_s:
            self.stage = stage
            self._last_write = now
            self.store.progress(self.job_id, stage, self.value)


class JobTimeLimitError(FprotosegError):
    """The job ran longer than FPROTOSEG_JOB_SOFT_TIME_LIMIT_S."""

    code = "time_limit"


class _CancelCheck:
    """Between batches: shutdown (requeue), the soft time limit (fail), cancel (asked of the job
    store at most every ``interval_s``). The time limit is checked here as well as by Celery so
    the embedded worker enforces it too."""

    def __init__(
        self,
        store: JobStore,
        job_id: str,
        interval_s: float,
        should_stop: Callable[[], bool] | None,
        time_limit_s: float,
    ) -> None:
        self.store, self.job_id, self.interval_s, self.should_stop = store, job_id, interval_s, should_stop
        self.time_limit_s = time_limit_s
        self._started = time.monotonic()
        self._last = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        if self.should_stop is not None and self.should_stop():
            raise JobInterrupted("the worker is shutting down; the job is requeued")
        now = time.monotonic()
        if now - self._started > self.time_limit_s:
            raise JobTimeLimitError(
                f"the job ran longer than FPROTOSEG_JOB_SOFT_TIME_LIMIT_S={self.time_limit_s:g} s"
            )
        if not self._cancelled and now - self._last >= self.interval_s:
            self._last = now
            with contextlib.suppress(JobStoreError):  # a store blip must not stop a long job
                self._cancelled = self.store.is_cancel_requested(self.job_id)
        return self._cancelled


def _count_tiles(result: Any) -> int | None:
    """Tiles inferred, from the pipeline's stats/provenance (None when it does not say)."""
    for source in (getattr(result, "stats", None), getattr(result, "provenance", None)):
        if not isinstance(source, dict):
            continue
        for key in ("tiles_inferred", "tile_count", "tiles", "n_tiles"):
            value = source.get(key)
            if isinstance(value, int):
                return value
            if isinstance(value, dict):
                for sub in ("inferred", "count", "total", "tissue"):
                    if isinstance(value.get(sub), int):
                        return int(value[sub])
    return None


def _publish(work_dir: Path, result_dir: Path) -> None:
    """Marker last, then one atomic rename: readers never see a partial result set."""
    listing = {name: (work_dir / name).stat().st_size for name in RESULT_FILES.values()}
    (work_dir / COMPLETE_MARKER).write_text(json.dumps({"files": listing, "at": time.time()}))
    try:
        os.rename(work_dir, result_dir)
    except OSError:
        if results_complete(result_dir):  # a duplicate delivery published first: keep its files
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            shutil.rmtree(result_dir, ignore_errors=True)
            os.rename(work_dir, result_dir)


def links(settings: Settings, job_id: str) -> dict[str, str]:
    """URLs of the job and its results (absolute when FPROTOSEG_PUBLIC_URL is set)."""
    base = (settings.public_url or "").rstrip("/")
    out = {"self": f"{base}/jobs/{job_id}"}
    out.update({name: f"{base}/jobs/{job_id}/{name}" for name in RESULT_FILES})
    return out


def callback_payload(settings: Settings, rec: JobRecord) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "job_id": rec.id,
        "state": rec.state,
        "finished_at": rec.finished_at,
        "upload_sha256": rec.upload_sha256,
        "links": links(settings, rec.id)
        if rec.state == SUCCEEDED
        else {"self": links(settings, rec.id)["self"]},
    }
    if rec.error_code:
        payload["error"] = {"code": rec.error_code, "message": rec.error_message}
    return payload


def _notify(settings: Settings, rec: JobRecord | None) -> None:
    if rec is None or not rec.callback_url:
        return
    ok = send_callback(
        rec.callback_url,
        callback_payload(settings, rec),
        secret=settings.callback_secret,
        timeout_s=settings.callback_timeout_s,
        attempts=settings.callback_attempts,
        backoff_s=settings.callback_backoff_s,
    )
    log.info("job %s: callback to %s %s", rec.id, rec.callback_url, "delivered" if ok else "NOT delivered")


def _discard_upload(settings: Settings, rec: JobRecord) -> None:
    """With FPROTOSEG_KEEP_UPLOADS=false the slide goes once its job is final (results stay)."""
    if not settings.keep_uploads and rec.upload_path:
        with contextlib.suppress(OSError):
            upload_path(settings, rec).unlink(missing_ok=True)


def _finish(
    store: JobStore, settings: Settings, job_id: str, state: str, from_states: list[str], **changes: Any
) -> JobRecord | None:
    """Terminal compare-and-set; only the delivery that wins it sends the callback."""
    rec = store.transition(job_id, state, from_states, finished_at=time.time(), **changes)
    if rec is not None:
        _discard_upload(settings, rec)
        log.info(
            "job %s: %s%s",
            job_id,
            state,
            f" ({rec.error_code}: {rec.error_message})" if rec.error_code else "",
        )
        _notify(settings, rec)
        return rec
    return store.get(job_id)


def fail_job(store: JobStore, settings: Settings, job_id: str, code: str, message: str) -> JobRecord | None:
    """Mark a queued/running job failed (once) and send its callback."""
    return _finish(
        store,
        settings,
        job_id,
        FAILED,
        [QUEUED, RUNNING],
        stage="failed",
        error_code=code,
        error_message=message,
    )


def process_job(
    job_id: str,
    settings: Settings,
    store: JobStore | None = None,
    *,
    should_stop: Callable[[], bool] | None = None,
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


def _process(
    job_id: str, settings: Settings, store: JobStore, should_stop: Callable[[], bool] | None
) -> JobRecord | None:
    rec = store.get(job_id)
    if rec is None:
        log.warning("job %s: no such job record; message dropped", job_id)
        return None
    if rec.terminal:
        log.info("job %s: already %s; redelivery ignored", job_id, rec.state)
        return rec
    result_dir = settings.result_dir(job_id)
    if results_complete(result_dir):  # redelivered after the results were published
        return _finish(store, settings, job_id, SUCCEEDED, [QUEUED, RUNNING], progress=1.0, stage="done")
    if rec.cancel_requested:
        return _finish(store, settings, job_id, CANCELLED, [QUEUED, RUNNING], stage="cancelled")
    if rec.attempts >= settings.max_delivery_attempts:
        return fail_job(
            store,
            settings,
            job_id,
            "worker_lost",
            f"the worker processing this job stopped {rec.attempts} times (out of memory or killed); "
            "check the worker logs and the slide",
        )
    attempt = rec.attempts + 1
    rec = store.transition(
        job_id,
        RUNNING,
        [QUEUED, RUNNING],
        attempts=attempt,
        started_at=rec.started_at or time.time(),
        stage="loading model",
        progress=0.0,
    )
    if rec is None:  # cancelled between the read and the claim
        return store.get(job_id)
    log.info("job %s: running (attempt %d)", job_id, attempt)

    started = time.monotonic()
    work_dir = settings.jobs_dir / job_id / f"work-{attempt}-{os.getpid()}"
    try:
        segmenter = get_segmenter(settings)
        from worker.pipeline import PipelineOptions, run

        # The gzip copy lets the API answer Accept-Encoding: gzip without recompressing per request.
        extra = {"batch_size": settings.batch_size} if settings.batch_size else {}
        options = PipelineOptions(geojson_gzip=True, **extra)
        shutil.rmtree(work_dir, ignore_errors=True)
        work_dir.mkdir(parents=True)
        result = run(
            upload_path(settings, rec),
            work_dir,
            segmenter,
            options=options,
            mpp_override=rec.mpp,
            progress=_Progress(store, job_id, settings.progress_interval_s),
            should_cancel=_CancelCheck(
                store, job_id, settings.cancel_poll_interval_s, should_stop, settings.job_soft_time_limit_s
            ),
        )
        store.progress(job_id, "publishing results", 0.99)
        _publish(work_dir, result_dir)
        for stale in result_dir.parent.glob("work-*"):  # partial output of attempts whose worker died
            shutil.rmtree(stale, ignore_errors=True)
    except JobInterrupted:
        shutil.rmtree(work_dir, ignore_errors=True)
        store.transition(job_id, QUEUED, [RUNNING], attempts=attempt - 1, stage="requeued", progress=0.0)
        log.info("job %s: interrupted by shutdown, requeued", job_id)
        return store.get(job_id)
    except JobCancelledError:
        shutil.rmtree(work_dir, ignore_errors=True)
        return _finish(store, settings, job_id, CANCELLED, [QUEUED, RUNNING], stage="cancelled")
    except JobStoreError:
        shutil.rmtree(work_dir, ignore_errors=True)
        raise
    except FprotosegError as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        return fail_job(store, settings, job_id, exc.code, exc.message)
    except MemoryError:
        shutil.rmtree(work_dir, ignore_errors=True)
        return fail_job(
            store, settings, job_id, "out_of_memory", "the worker ran out of memory on this slide"
        )
    except Exception as exc:
        shutil.rmtree(work_dir, ignore_errors=True)
        if type(exc).__name__ == "SoftTimeLimitExceeded":  # Celery's, matched by name (no import)
            return fail_job(
                store,
                settings,
                job_id,
                "time_limit",
                "the job ran longer than FPROTOSEG_JOB_SOFT_TIME_LIMIT_S="
                f"{settings.job_soft_time_limit_s:g} s",
            )
        log.exception("job %s: unexpected error", job_id)
        return fail_job(
            store,
            settings,
            job_id,
            "internal_error",
            f"internal error ({type(exc).__name__}) while processing the slide; the worker log has details",
        )

    duration_s = time.monotonic() - started
    tiles = _count_tiles(result)
    final = store.transition(
        job_id,
        SUCCEEDED,
        [RUNNING],
        finished_at=time.time(),
        progress=1.0,
        stage="done",
        duration_s=round(duration_s, 3),
        tiles=tiles,
    )
    if final is None:  # cancelled while publishing, or a racing delivery finished first
        return store.get(job_id)
    log.info("job %s: succeeded in %.1f s (%s tiles)", job_id, duration_s, tiles)
    _discard_upload(settings, final)
    with contextlib.suppress(JobStoreError):
        store.record_finished_job(duration_s, tiles)
    _notify(settings, final)
    return final
