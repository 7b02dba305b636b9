"""Where cohorts are kept: beside the jobs, in the same SQLite file or the same Redis, in a table
(keys) of their own, so the job store's records and indexes stay exactly as they were.

A cohort record lists its members (job id and the client's external id, in the order sent); the
jobs themselves stay ordinary jobs (deduplicated, listed, downloadable one by one). Every change
is a compare-and-set like the job store's, so two API processes never both end a cohort (one
callback) nor both claim its callback delivery.
"""

from __future__ import annotations

import json
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Final, Literal

from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.jobstore import JobStore, RedisJobStore, SqliteJobStore

CohortState = Literal["running", "ended"]
COHORT_RUNNING: Final = "running"
COHORT_ENDED: Final = "ended"


@dataclass
class CohortMember:
    job_id: str
    external_id: str | None = None


@dataclass
class CohortRecord:
    """One cohort. Times are UNIX epoch seconds (UTC)."""

    id: str
    tenant: str = ""
    state: CohortState = COHORT_RUNNING
    members: list[CohortMember] = field(default_factory=list)
    model: str | None = None
    mpp: float | None = None
    callback_url: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    cancel_requested: bool = False
    callback_status: str | None = None  # pending | delivered | failed (None: no callback)
    callback_attempts: int = 0
    callback_due_at: float | None = None  # the next delivery attempt (a claim pushes it on)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: str | bytes) -> CohortRecord:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        data["members"] = [CohortMember(**m) for m in data.get("members", [])]
        return cls(**{k: v for k, v in data.items() if k in known})

    def changed(self, changes: dict[str, Any]) -> CohortRecord:
        data = {**asdict(self), **changes, "updated_at": time.time()}
        data["members"] = [
            m if isinstance(m, CohortMember) else CohortMember(**m) for m in data["members"]
        ]
        return CohortRecord(**data)


# a condition a compare-and-set requires of the current record
CohortWhere = Callable[[CohortRecord], bool]


class CohortStore(ABC):
    """What the API needs to keep cohorts."""

    @abstractmethod
    def create(self, record: CohortRecord) -> CohortRecord: ...

    @abstractmethod
    def get(self, cohort_id: str) -> CohortRecord | None: ...

    @abstractmethod
    def modify(self, cohort_id: str, where: CohortWhere, **changes: Any) -> CohortRecord | None:
        """Apply ``changes`` atomically when ``where(record)`` holds; None otherwise."""

    @abstractmethod
    def running_ids(self) -> list[str]:
        """Cohorts not ended yet, oldest first (what the sweeper looks at)."""

    @abstractmethod
    def callback_ids(self) -> list[str]:
        """Ended cohorts whose callback is still pending."""

    @abstractmethod
    def delete(self, cohort_id: str) -> None: ...


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS cohorts (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    callback_pending INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS cohorts_state ON cohorts(state, created_at);
"""


class SqliteCohortStore(CohortStore):
    """A ``cohorts`` table in the job store's SQLite file, through the job store's connections."""

    def __init__(self, jobs: SqliteJobStore) -> None:
        # The job store's connections and transactions: one place decides WAL, timeouts and what a
        # full disk does (the journal given back so the next write finds room).
        self.path = jobs.path
        self._jobs = jobs
        try:
            jobs._db().executescript(_SQLITE_SCHEMA)
        except sqlite3.Error as exc:
            raise JobStoreError(f"cannot open the cohort table: {exc}") from None

    def _tx(self) -> AbstractContextManager[sqlite3.Connection]:
        return self._jobs._tx()

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return self._jobs._read(sql, args)

    @staticmethod
    def _row(rec: CohortRecord) -> tuple[Any, ...]:
        return (
            rec.tenant,
            rec.state,
            int(rec.callback_status == "pending"),
            rec.created_at,
            rec.to_json(),
        )

    def create(self, record: CohortRecord) -> CohortRecord:
        with self._tx() as db:
            db.execute(
                "INSERT INTO cohorts (tenant, state, callback_pending, created_at, record, id) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (*self._row(record), record.id),
            )
        return record

    def get(self, cohort_id: str) -> CohortRecord | None:
        rows = self._read("SELECT record FROM cohorts WHERE id = ?", (cohort_id,))
        return CohortRecord.from_json(rows[0][0]) if rows else None

    def modify(self, cohort_id: str, where: CohortWhere, **changes: Any) -> CohortRecord | None:
        with self._tx() as db:
            row = db.execute("SELECT record FROM cohorts WHERE id = ?", (cohort_id,)).fetchone()
            if row is None:
                return None
            rec = CohortRecord.from_json(row[0])
            if not where(rec):
                return None
            rec = rec.changed(changes)
            db.execute(
                "UPDATE cohorts SET tenant = ?, state = ?, callback_pending = ?, created_at = ?, record = ? "
                "WHERE id = ?",
                (*self._row(rec), cohort_id),
            )
            return rec

    def running_ids(self) -> list[str]:
        rows = self._read(
            "SELECT id FROM cohorts WHERE state = ? ORDER BY created_at", (COHORT_RUNNING,)
        )
        return [r[0] for r in rows]

    def callback_ids(self) -> list[str]:
        rows = self._read("SELECT id FROM cohorts WHERE callback_pending = 1 ORDER BY created_at")
        return [r[0] for r in rows]

    def delete(self, cohort_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM cohorts WHERE id = ?", (cohort_id,))


class RedisCohortStore(CohortStore):
    """``<prefix>cohort:<id>`` JSON records, with two sorted sets: running cohorts and cohorts
    whose callback is pending. Compare-and-set by WATCH/MULTI."""

    def __init__(self, jobs: RedisJobStore) -> None:
        # The job store's client, key prefix and error mapping: one place decides them.
        self.client = jobs.client
        self.prefix = jobs.prefix
        self._jobs = jobs
        self._watch_error = jobs._watch_error

    def _k(self, *parts: str) -> str:
        return self._jobs._k(*parts)

    def _errors(self) -> AbstractContextManager[None]:
        return self._jobs._errors("cohort store")

    def _index(self, pipe: Any, rec: CohortRecord) -> None:
        if rec.state == COHORT_RUNNING:
            pipe.zadd(self._k("cohorts", "running"), {rec.id: rec.created_at})
        else:
            pipe.zrem(self._k("cohorts", "running"), rec.id)
        if rec.callback_status == "pending":
            pipe.zadd(self._k("cohorts", "callbacks"), {rec.id: rec.created_at})
        else:
            pipe.zrem(self._k("cohorts", "callbacks"), rec.id)

    def create(self, record: CohortRecord) -> CohortRecord:
        with self._errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._k("cohort", record.id), record.to_json())
            self._index(pipe, record)
            pipe.execute()
        return record

    def get(self, cohort_id: str) -> CohortRecord | None:
        with self._errors():
            raw = self.client.get(self._k("cohort", cohort_id))
        return CohortRecord.from_json(raw) if raw else None

    def modify(self, cohort_id: str, where: CohortWhere, **changes: Any) -> CohortRecord | None:
        key = self._k("cohort", cohort_id)
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    rec = CohortRecord.from_json(raw) if raw else None
                    if rec is None or not where(rec):
                        pipe.unwatch()
                        return None
                    new = rec.changed(changes)
                    pipe.multi()
                    pipe.set(key, new.to_json())
                    self._index(pipe, new)
                    pipe.execute()
                    return new
                except self._watch_error:
                    continue

    def running_ids(self) -> list[str]:
        with self._errors():
            return [i.decode() for i in self.client.zrange(self._k("cohorts", "running"), 0, -1)]

    def callback_ids(self) -> list[str]:
        with self._errors():
            return [i.decode() for i in self.client.zrange(self._k("cohorts", "callbacks"), 0, -1)]

    def delete(self, cohort_id: str) -> None:
        with self._errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._k("cohort", cohort_id))
            pipe.zrem(self._k("cohorts", "running"), cohort_id)
            pipe.zrem(self._k("cohorts", "callbacks"), cohort_id)
            pipe.execute()


def open_cohort_store(jobs: JobStore) -> CohortStore:
    """The cohort store beside ``jobs`` (same SQLite file, or same Redis and key prefix)."""
    if isinstance(jobs, RedisJobStore):
        return RedisCohortStore(jobs)
    if isinstance(jobs, SqliteJobStore):
        return SqliteCohortStore(jobs)
    raise TypeError(f"no cohort store for {type(jobs).__name__}")
