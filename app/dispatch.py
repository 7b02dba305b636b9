"""How a new job reaches a worker: Celery by task name, or the embedded worker's queue.

Both dispatchers also answer "is a worker there?" for /readyz and "how many are waiting in the
broker?" for /metrics. Neither imports torch: the Celery app here is configuration only
(``fprotoseg.worker.service.celery_app``), the task is named, never imported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from fprotoseg.model.errors import ConfigurationError
from fprotoseg.worker.service.jobstore import EmbeddedQueue, JobStore
from fprotoseg.worker.service.maintenance import Resubmit
from fprotoseg.worker.service.settings import Settings

log = logging.getLogger("fprotoseg.api")


class Dispatcher(Protocol):
    kind: str
    # how a requeued job (its worker lost) reaches a worker again; None where the workers take
    # queued jobs from the job store themselves (the embedded worker)
    resubmit: Resubmit | None

    def submit(self, job_id: str) -> None:
        """Hand a queued job to the workers; raise on a broker failure."""
        ...

    def submit_many(self, job_ids: Sequence[str]) -> list[str]:
        """Hand many queued jobs to the workers (a cohort's) over one broker connection; the ids
        that could not be sent (from the first failure on), empty when all were."""
        ...

    def workers_alive(self) -> int: ...

    def broker_ok(self) -> bool: ...

    def broker_queue_length(self) -> int | None: ...


class EmbeddedDispatcher:
    """The local worker process polls the SQLite store for queued jobs: nothing to send."""

    kind = "embedded"
    resubmit: Resubmit | None = None

    def __init__(self, settings: Settings, store: EmbeddedQueue) -> None:
        self.settings, self.store = settings, store

    def submit(self, job_id: str) -> None:
        return None

    def submit_many(self, job_ids: Sequence[str]) -> list[str]:
        return []

    def workers_alive(self) -> int:
        now = time.time()
        beats = self.store.heartbeats()
        return sum(1 for at in beats.values() if now - at <= self.settings.heartbeat_stale_s)

    def broker_ok(self) -> bool:
        return True

    def broker_queue_length(self) -> int | None:
        return None


class CeleryDispatcher:
    """``send_task`` by name to the configured Redis broker."""

    kind = "celery"
    PING_CACHE_S = 5.0

    def __init__(self, settings: Settings) -> None:
        from fprotoseg.worker.service.celery_app import make_celery

        self.settings = settings
        self.resubmit: Resubmit | None = self.submit
        self.app = make_celery(settings)
        self._ping_lock = threading.Lock()
        self._ping_at = 0.0
        self._ping_count = 0

    def submit(self, job_id: str, producer: object | None = None) -> None:
        from fprotoseg.worker.service.celery_app import TASK_NAME

        self.app.send_task(
            TASK_NAME,
            args=[job_id],
            queue=self.settings.queue,
            task_id=job_id,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
            producer=producer,
        )

    def submit_many(self, job_ids: Sequence[str]) -> list[str]:
        """One producer (one pooled connection) for every message, instead of one acquired per job."""
        sent = 0
        try:
            with self.app.producer_or_acquire() as producer:
                for job_id in job_ids:
                    self.submit(job_id, producer)
                    sent += 1
        except Exception as exc:
            log.error("%d of %d jobs could not be queued: %s", len(job_ids) - sent, len(job_ids), exc)
        return list(job_ids[sent:])

    def workers_alive(self) -> int:
        with self._ping_lock:  # a broadcast ping waits ~1 s: cache its answer briefly
            if time.monotonic() - self._ping_at > self.PING_CACHE_S:
                try:
                    replies = self.app.control.ping(timeout=1.0) or []
                except Exception as exc:
                    log.warning("worker ping failed: %s", exc)
                    replies = []
                self._ping_count = len(replies)
                self._ping_at = time.monotonic()
            return self._ping_count

    def broker_ok(self) -> bool:
        try:
            with self.app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=2)
                conn.default_channel.client.ping()
            return True
        except Exception as exc:
            log.warning("broker unreachable: %s", exc)
            return False

    def broker_queue_length(self) -> int | None:
        from fprotoseg.worker.service.celery_app import queue_length

        try:
            return queue_length(self.app, self.settings)
        except Exception:
            return None


def make_dispatcher(settings: Settings, store: JobStore) -> Dispatcher:
    if not settings.embedded:
        return CeleryDispatcher(settings)
    if not isinstance(store, EmbeddedQueue):
        raise ConfigurationError("the embedded worker needs the SQLite job store (no FPROTOSEG_BROKER_URL)")
    return EmbeddedDispatcher(settings, store)
