"""The job store: one interface (:mod:`.base`), SQLite in the embedded default (:mod:`.sqlite`),
Redis when a broker is configured (:mod:`.redis`).

Records live outside the API process (a SQLite file in the data dir, or Redis), so an API restart
loses nothing. Cheap to import: no torch, no Celery, and Redis only when it is used.
"""

from __future__ import annotations

from fprotoseg.worker.service.jobstore.base import DURATION_BUCKETS_S, EmbeddedQueue, JobRecord, JobStore
from fprotoseg.worker.service.jobstore.redis import RedisJobStore
from fprotoseg.worker.service.jobstore.sqlite import SqliteJobStore
from fprotoseg.worker.service.settings import Settings

__all__ = [
    "DURATION_BUCKETS_S",
    "EmbeddedQueue",
    "JobRecord",
    "JobStore",
    "RedisJobStore",
    "SqliteJobStore",
    "open_jobstore",
]


def open_jobstore(settings: Settings) -> JobStore:
    """Redis when FPROTOSEG_BROKER_URL is set, else the SQLite file in the data dir."""
    if settings.broker_url:
        return RedisJobStore(settings.broker_url, settings.redis_key_prefix)
    return SqliteJobStore(settings.sqlite_path)
