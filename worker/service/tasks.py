"""The Celery task: a thin wrapper over :func:`fprotoseg.worker.service.jobs.process_job`.

Workers load the model once per worker process (``worker_process_init``) and keep one job-store
connection per process. Only transient errors (job store or broker unreachable) are retried;
a bad slide fails its job with a reason instead. ``celery -A fprotoseg.worker.service.tasks worker``
works too; ``fprotoseg worker`` is the documented way.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import JobStoreError, TransientJobError
from fprotoseg.worker.service.callbacks import CallbackOutbox
from fprotoseg.worker.service.celery_app import TASK_NAME, make_celery
from fprotoseg.worker.service.jobs import fail_job, process_job
from fprotoseg.worker.service.jobstore import JobStore, open_jobstore
from fprotoseg.worker.service.segmenters import get_segmenter
from fprotoseg.worker.service.settings import Settings, load_settings

log = logging.getLogger(__name__)


def register_tasks(app: Any, settings: Settings) -> Any:
    """Add the job task (and the model preload) to a Celery app; returns the task."""
    from celery.signals import worker_process_init, worker_ready, worker_shutdown

    @functools.lru_cache(maxsize=1)
    def store() -> JobStore:  # one connection pool per worker process (created after the fork)
        return open_jobstore(settings)

    @worker_process_init.connect(weak=False)
    def _preload_model(**_: Any) -> None:
        try:
            get_segmenter(settings)
        except Exception as exc:  # the job will fail with the same reason; the worker stays up
            log.error("model could not be loaded: %s", exc)

    outboxes: list[CallbackOutbox] = []

    @worker_ready.connect(weak=False)
    def _start_outbox(**_: Any) -> None:
        """Callbacks are delivered by a thread of the worker's main process, never inside a job."""
        outboxes.append(CallbackOutbox(settings, open_jobstore(settings)).start())

    @worker_shutdown.connect(weak=False)
    def _stop_outbox(**_: Any) -> None:
        for outbox in outboxes:
            outbox.stop()

    class JobTask(app.Task):  # app: Any (Celery is untyped), so its Task is too
        def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
            """Failures that never reach process_job's own handling still end the job record.

            Celery calls this in the worker's main process after a hard time limit killed the
            pool process, and after the last retry of a transient error.
            """
            job_id = (args[0] if args else None) or (kwargs or {}).get("job_id")
            if job_id:
                record_task_failure(job_id, exc, settings, store())

    @app.task(
        name=TASK_NAME,
        shared=False,  # bound to this app only (one app per process; tests build several)
        base=JobTask,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        autoretry_for=(TransientJobError,),
        max_retries=settings.transient_retries,
        retry_backoff=5,
        retry_backoff_max=120,
        retry_jitter=True,
    )
    def process_job_task(self: Any, job_id: str) -> str | None:
        rec = process_job(job_id, settings, store())
        return rec.state if rec is not None else None

    return process_job_task


def record_task_failure(job_id: str, exc: BaseException, settings: Settings, store: JobStore) -> None:
    """Mark the job failed for a hard time limit or exhausted retries (no-op when already final)."""
    if type(exc).__name__ == "TimeLimitExceeded":
        code = ErrorCode.TIME_LIMIT
        message = (
            "the job ran past FPROTOSEG_JOB_HARD_TIME_LIMIT_S="
            f"{settings.job_hard_time_limit_s:g} s and its worker process was stopped"
        )
    elif isinstance(exc, TransientJobError):
        code, message = (
            ErrorCode.TRANSIENT_ERROR,
            f"{exc.message} (gave up after {settings.transient_retries} retries)",
        )
    else:
        return
    try:
        fail_job(store, settings, job_id, code, message)
    except JobStoreError as err:
        log.error("job %s: could not record %s: %s", job_id, code, err.message)


def create_worker_app(settings: Settings | None = None) -> Any:
    """A Celery app with the job task registered, for ``fprotoseg worker``."""
    settings = settings or load_settings()
    app = make_celery(settings)
    register_tasks(app, settings)
    return app


def __getattr__(name: str) -> Any:
    """``celery -A fprotoseg.worker.service.tasks`` looks up ``app``: built on first access."""
    if name == "app":
        value = create_worker_app()
        globals()["app"] = value
        return value
    raise AttributeError(name)
