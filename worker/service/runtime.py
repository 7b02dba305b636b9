"""What a running job reports and obeys between batches: progress, cancel, shutdown, time limit.

The pipeline calls ``progress(stage, done, total)`` and ``should_cancel()``; these two adapters
turn them into job-store writes at a bounded rate and into the exceptions the job service
handles (requeue on shutdown, fail on the soft time limit, cancel when asked).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from fprotoseg.worker.errors import JobInterrupted, JobStoreError, JobTimeLimitError
from fprotoseg.worker.service.jobstore import JobStore


class JobProgress:
    """Maps the pipeline's (stage, done, total) onto one monotone 0..1, written at a bounded rate.

    A write happens when the stage changes, when ``interval_s`` has passed, or when the value has
    advanced by ``step`` since the last write. The last rule matters at the end of a stage: the
    pipeline calls once per batch, so an update dropped by the interval alone would stay unseen
    for the whole next batch (a 3-batch job showed its second batch's count only at the end). It
    keeps the rate bounded all the same: at most ``1 / step`` such writes per job.
    """

    def __init__(self, store: JobStore, job_id: str, interval_s: float, step: float = 0.02) -> None:
        self.store, self.job_id, self.interval_s, self.step = store, job_id, interval_s, step
        self.value = 0.0
        self.stage = ""
        self._last_write_s = 0.0
        self._written = 0.0
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
        now_s = time.monotonic()
        if (
            stage != self.stage
            or now_s - self._last_write_s >= self.interval_s
            or self.value - self._written >= self.step
        ):
            self.stage = stage
            self._last_write_s = now_s
            self._written = self.value
            self.store.progress(self.job_id, stage, self.value)


class StopCheck:
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
        self._started_s = time.monotonic()
        self._last_s = 0.0
        self._cancelled = False

    def __call__(self) -> bool:
        if self.should_stop is not None and self.should_stop():
            raise JobInterrupted("the worker is shutting down; the job is requeued")
        now_s = time.monotonic()
        if now_s - self._started_s > self.time_limit_s:
            raise JobTimeLimitError(
                f"the job ran longer than FPROTOSEG_JOB_SOFT_TIME_LIMIT_S={self.time_limit_s:g} s"
            )
        if not self._cancelled and now_s - self._last_s >= self.interval_s:
            self._last_s = now_s
            with contextlib.suppress(JobStoreError):  # a store blip must not stop a long job
                self._cancelled = self.store.is_cancel_requested(self.job_id)
        return self._cancelled
