"""The job store: one interface, SQLite in the embedded default, Redis when a broker is configured.

A job record is the single source of truth for a job's state (queued -> running -> succeeded |
failed | cancelled), progress, stage, timestamps and error. Every state change is a
compare-and-set (``transition``), so a redelivered or duplicated Celery message can never move a
finished job again: that is what makes "succeeded exactly once" hold after a worker is killed.
Records live outside the API process (a SQLite file in the data dir, or Redis), so an API restart
loses nothing. Cheap to import: no torch, no Celery.
"""

from __future__ import annotations

import builtins
import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fprotoseg.worker.errors import DuplicateJobError, JobStoreError
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    STATES,
    TERMINAL_STATES,
    JobState,
)
from fprotoseg.worker.service.storage import give_back_sqlite_journal, is_out_of_space

__all__ = [
    "DURATION_BUCKETS_S",
    "JobRecord",
    "JobStore",
    "RedisJobStore",
    "SqliteJobStore",
    "open_jobstore",
]


# Prometheus-style job duration buckets (seconds): a small slide on a GPU takes seconds, a
# large one on a CPU hours.
DURATION_BUCKETS_S = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0)


@dataclass
class JobRecord:
    """Everything known about one job. Times are UNIX epoch seconds (UTC)."""

    id: str
    state: JobState = QUEUED
    progress: float = 0.0
    stage: str = "queued"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error_code: str | None = None
    error_message: str | None = None
    upload_path: str = ""
    upload_sha256: str = ""
    upload_bytes: int = 0
    upload_format: str = ""
    filename: str = ""  # the client's name exactly as sent (data only; never used as a path)
    tenant: str = ""  # who submitted it (from the API key); "" = before tenants existed
    metadata: dict[str, Any] | None = None  # the client's small JSON object (e.g. external_id)
    mpp: float | None = None
    model: str | None = None  # a name from GET /models; None = the configured default
    slide_uri: str | None = None  # file:// or s3:// when the slide was named, not uploaded
    callback_url: str | None = None
    idempotency_key: str | None = None
    params_hash: str = ""
    attempts: int = 0
    cancel_requested: bool = False
    tiles: int | None = None
    duration_s: float | None = None
    heartbeat_at: float | None = None  # last sign of life of the running attempt
    idempotency_released: bool = False  # failed/cancelled/dead: its key may start a new job
    callback_status: str | None = None  # pending | delivered | failed (None: no callback)
    callback_attempts: int = 0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def changed(self, changes: dict[str, Any], to_state: str | None = None) -> JobRecord:
        """A copy with ``changes`` applied (and the state, if given), stamped ``updated_at`` now."""
        data = {**self.to_dict(), **changes}
        if to_state is not None:
            data["state"] = to_state
        data["updated_at"] = time.time()
        return JobRecord.from_dict(data)


_COLUMNS = tuple(f.name for f in fields(JobRecord))


class JobStore(ABC):
    """What the API, the embedded worker and the Celery workers need from job storage."""

    @abstractmethod
    def create(self, record: JobRecord) -> JobRecord:
        """Insert a new record; DuplicateJobError if its idempotency key is taken."""

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def list(
        self, *, limit: int, offset: int = 0, state: str | None = None, tenant: str | None = None
    ) -> tuple[builtins.list[JobRecord], int]:
        """A page of records, newest first, and the total count (of that state and tenant;
        ``tenant=None`` = every tenant, for admin keys)."""

    @abstractmethod
    def find_by_idempotency_key(self, key: str, tenant: str = "") -> JobRecord | None:
        """The job this tenant created with ``key`` (keys of other tenants never match)."""

    @abstractmethod
    def find_by_content(self, sha256: str, params_hash: str, tenant: str = "") -> JobRecord | None:
        """This tenant's newest job on the same bytes with the same parameters that is not
        failed/cancelled."""

    @abstractmethod
    def release_idempotency_key(self, job_id: str) -> None:
        """Free the job's Idempotency-Key so a resubmission makes a new job (the job is final
        without results, or dead)."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """Remove the record and its index entries (retention)."""

    @abstractmethod
    def finished_before(self, ts: float, limit: int = 500) -> builtins.list[JobRecord]:
        """Terminal jobs whose ``finished_at`` is older than ``ts``."""

    @abstractmethod
    def _modify(
        self,
        job_id: str,
        allowed: Iterable[str],
        to_state: str | None,
        changes: dict[str, Any],
        where: Callable[[JobRecord], bool] | None = None,
    ) -> JobRecord | None:
        """Atomically apply ``changes`` (and ``to_state`` if given) when the state is in ``allowed``
        (and ``where(record)`` holds, if given)."""

    # --- callback outbox: which finished jobs still owe their callback, and when to try next ---
    @abstractmethod
    def schedule_callback(self, job_id: str, due_at: float) -> None: ...

    @abstractmethod
    def due_callbacks(self, now: float, limit: int = 20) -> builtins.list[str]: ...

    @abstractmethod
    def claim_callback(self, job_id: str, now: float, lease_s: float) -> bool:
        """True for exactly one caller while the entry is due; it is pushed ``lease_s`` into the
        future, so a deliverer that dies mid-attempt is retried after the lease."""

    @abstractmethod
    def unschedule_callback(self, job_id: str) -> None: ...

    def transition(
        self,
        job_id: str,
        to_state: str,
        from_states: Iterable[str],
        where: Callable[[JobRecord], bool] | None = None,
        **changes: Any,
    ) -> JobRecord | None:
        """Compare-and-set: move to ``to_state`` only from one of ``from_states``; None if not."""
        return self._modify(job_id, from_states, to_state, changes, where)

    def annotate(self, job_id: str, **changes: Any) -> JobRecord | None:
        """Change fields (not the state) in whatever state the job is (callback bookkeeping)."""
        return self._modify(job_id, STATES, None, changes)

    def update(self, job_id: str, only_in_state: str, **changes: Any) -> bool:
        """Change fields (not the state) if the job is still in ``only_in_state``."""
        return self._modify(job_id, (only_in_state,), None, changes) is not None

    @abstractmethod
    def counts_by_state(self) -> dict[str, int]: ...

    @abstractmethod
    def oldest_queued(self) -> JobRecord | None:
        """The next job for the embedded worker (first in, first out)."""

    @abstractmethod
    def ids_in_state(self, state: str) -> builtins.list[str]: ...

    @abstractmethod
    def incr_metrics(self, increments: dict[str, float]) -> None:
        """Add to durable counters (job durations, tiles) that /metrics reads."""

    @abstractmethod
    def metrics(self) -> dict[str, float]: ...

    @abstractmethod
    def heartbeat(self, worker_name: str) -> None: ...

    @abstractmethod
    def heartbeats(self) -> dict[str, float]:
        """worker name -> UNIX time of its last heartbeat."""

    @abstractmethod
    def ping(self) -> None:
        """Raise JobStoreError when the store cannot be used."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    # --- shared logic on top of the primitives ---------------------------------------------------
    def progress(self, job_id: str, stage: str, progress: float) -> bool:
        return self.update(
            job_id,
            RUNNING,
            stage=stage,
            progress=max(0.0, min(1.0, float(progress))),
            heartbeat_at=time.time(),
        )

    def job_heartbeat(self, job_id: str, attempt: int) -> bool:
        """The running attempt ``attempt`` is alive; False once the job moved on (requeued, ended)."""
        return (
            self._modify(
                job_id, (RUNNING,), None, {"heartbeat_at": time.time()}, lambda r: r.attempts == attempt
            )
            is not None
        )

    def request_cancel(self, job_id: str) -> JobRecord | None:
        """A queued job is cancelled at once; a running one is flagged and stops at its next batch."""
        now = time.time()
        rec = self.transition(
            job_id, CANCELLED, [QUEUED], finished_at=now, stage="cancelled", cancel_requested=True
        )
        if rec is not None:
            return rec
        self.update(job_id, RUNNING, cancel_requested=True)
        return self.get(job_id)

    def is_cancel_requested(self, job_id: str) -> bool:
        rec = self.get(job_id)
        return rec is None or rec.cancel_requested or rec.state == CANCELLED

    def record_finished_job(self, duration_s: float, tiles: int | None) -> None:
        """Durable Prometheus-style histogram of job durations plus tile counters."""
        incr: dict[str, float] = {"duration_count": 1, "duration_sum": duration_s}
        for bound in DURATION_BUCKETS_S:
            if duration_s <= bound:
                incr[f"duration_le_{bound:g}"] = 1
        if tiles:
            incr["tiles_total"] = tiles
            incr["tile_seconds_total"] = duration_s
        self.incr_metrics(incr)


def _encode(record: JobRecord) -> str:
    return json.dumps(record.to_dict(), separators=(",", ":"))


# ---------------------------------------------------------------------------------------------
# SQLite (embedded default)
# ---------------------------------------------------------------------------------------------

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    sha256 TEXT NOT NULL DEFAULT '',
    params_hash TEXT NOT NULL DEFAULT '',
    idempotency_key TEXT UNIQUE,
    record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs(created_at);
CREATE INDEX IF NOT EXISTS jobs_state_created ON jobs(state, created_at);
CREATE INDEX IF NOT EXISTS jobs_content ON jobs(sha256, params_hash);
CREATE TABLE IF NOT EXISTS metrics (name TEXT PRIMARY KEY, value REAL NOT NULL);
CREATE TABLE IF NOT EXISTS heartbeats (name TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS callbacks (job_id TEXT PRIMARY KEY, due_at REAL NOT NULL);
"""

# Added after the first release: applied to an existing file by _migrate (idempotent).
_SQLITE_TENANT_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs(tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_tenant_state_created ON jobs(tenant, state, created_at);
"""


def _scoped_key(tenant: str, key: str) -> str:
    """Idempotency keys are per tenant: the same key from two tenants names two jobs."""
    return f"{tenant}\x1f{key}"


class SqliteJobStore(JobStore):
    """One SQLite file in WAL mode, shared by the API and the local worker process.

    The record is kept as JSON beside the indexed columns it is queried by; every write is one
    ``BEGIN IMMEDIATE`` transaction, so API threads and the worker process never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            db = self._db()
            db.executescript(_SQLITE_SCHEMA)  # executescript manages its own transaction
            self._migrate(db)
            for path in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
                if path.exists() and path.stat().st_uid == os.getuid():
                    path.chmod(0o600)  # patient data: private whatever the umask was
        except (OSError, sqlite3.Error) as exc:
            raise JobStoreError(f"cannot open the job store: {exc}") from None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        if "tenant" not in columns:
            db.execute("ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
        db.executescript(_SQLITE_TENANT_INDEXES)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        # A small write-ahead log (checkpoint every 64 pages, file cut back to 256 KiB): at SQLite's
        # default (1000 pages, never cut back) it took the last MiBs of a nearly full disk.
        db.execute("PRAGMA wal_autocheckpoint=64")
        db.execute("PRAGMA journal_size_limit=262144")
        return db

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self._connect()
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if is_out_of_space(exc):
                give_back_sqlite_journal(db)  # so the next write (the job's disk_full) finds room
            raise JobStoreError(f"job store: {exc}") from None

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> builtins.list[tuple[Any, ...]]:
        try:
            return self._db().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise JobStoreError(f"job store: {exc}") from None

    @staticmethod
    def _row_args(rec: JobRecord) -> tuple[Any, ...]:
        idem = (
            _scoped_key(rec.tenant, rec.idempotency_key)
            if rec.idempotency_key and not rec.idempotency_released
            else None
        )
        return (rec.state, rec.created_at, rec.upload_sha256, rec.params_hash, idem, rec.tenant, _encode(rec))

    def create(self, record: JobRecord) -> JobRecord:
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO jobs (state, created_at, sha256, params_hash, idempotency_key, tenant, "
                    "record, id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (*self._row_args(record), record.id),
                )
        except JobStoreError:
            if record.idempotency_key:
                existing = self.find_by_idempotency_key(record.idempotency_key, record.tenant)
                if existing is not None:
                    raise DuplicateJobError(existing.id) from None
            raise
        return record

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def list(
        self, *, limit: int, offset: int = 0, state: str | None = None, tenant: str | None = None
    ) -> tuple[builtins.list[JobRecord], int]:
        clauses, args = [], []
        if state:
            clauses.append("state = ?")
            args.append(state)
        if tenant is not None:
            clauses.append("tenant = ?")
            args.append(tenant)
        where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
        rows = self._read(
            f"SELECT record FROM jobs {where} ORDER BY created_at DESC, rowid DESC LIMIT ? OFFSET ?",
            (*args, int(limit), int(offset)),
        )
        total = self._read(f"SELECT COUNT(*) FROM jobs {where}", tuple(args))[0][0]
        return [JobRecord.from_dict(json.loads(r[0])) for r in rows], int(total)

    def find_by_idempotency_key(self, key: str, tenant: str = "") -> JobRecord | None:
        rows = self._read("SELECT record FROM jobs WHERE idempotency_key = ?", (_scoped_key(tenant, key),))
        return JobRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def find_by_content(self, sha256: str, params_hash: str, tenant: str = "") -> JobRecord | None:
        rows = self._read(
            "SELECT record FROM jobs WHERE sha256 = ? AND params_hash = ? AND tenant = ? "
            "AND state NOT IN (?, ?) ORDER BY created_at DESC LIMIT 1",
            (sha256, params_hash, tenant, FAILED, CANCELLED),
        )
        return JobRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def release_idempotency_key(self, job_id: str) -> None:
        self._modify(job_id, STATES, None, {"idempotency_released": True})

    def delete(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM callbacks WHERE job_id = ?", (job_id,))

    def finished_before(self, ts: float, limit: int = 500) -> builtins.list[JobRecord]:
        rows = self._read(
            "SELECT record FROM jobs WHERE state IN (?, ?, ?) "
            "AND json_extract(record, '$.finished_at') < ? LIMIT ?",
            (*sorted(TERMINAL_STATES), ts, int(limit)),
        )
        return [JobRecord.from_dict(json.loads(r[0])) for r in rows]

    def _modify(
        self,
        job_id: str,
        allowed: Iterable[str],
        to_state: str | None,
        changes: dict[str, Any],
        where: Callable[[JobRecord], bool] | None = None,
    ) -> JobRecord | None:
        allowed = tuple(allowed)
        with self._tx() as db:
            row = db.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            rec = JobRecord.from_dict(json.loads(row[0]))
            if rec.state not in allowed or (where is not None and not where(rec)):
                return None
            rec = rec.changed(changes, to_state)
            db.execute(
                "UPDATE jobs SET state = ?, created_at = ?, sha256 = ?, params_hash = ?, "
                "idempotency_key = ?, tenant = ?, record = ? WHERE id = ?",
                (*self._row_args(rec), job_id),
            )
            return rec

    def schedule_callback(self, job_id: str, due_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO callbacks (job_id, due_at) VALUES (?, ?) "
                "ON CONFLICT(job_id) DO UPDATE SET due_at = excluded.due_at",
                (job_id, due_at),
            )

    def due_callbacks(self, now: float, limit: int = 20) -> builtins.list[str]:
        rows = self._read(
            "SELECT job_id FROM callbacks WHERE due_at <= ? ORDER BY due_at LIMIT ?", (now, int(limit))
        )
        return [r[0] for r in rows]

    def claim_callback(self, job_id: str, now: float, lease_s: float) -> bool:
        with self._tx() as db:
            cur = db.execute(
                "UPDATE callbacks SET due_at = ? WHERE job_id = ? AND due_at <= ?",
                (now + lease_s, job_id, now),
            )
            return cur.rowcount == 1

    def unschedule_callback(self, job_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM callbacks WHERE job_id = ?", (job_id,))

    def counts_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(STATES, 0)
        for state, n in self._read("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
            counts[state] = int(n)
        return counts

    def oldest_queued(self) -> JobRecord | None:
        rows = self._read(
            "SELECT record FROM jobs WHERE state = ? ORDER BY created_at ASC, rowid ASC LIMIT 1", (QUEUED,)
        )
        return JobRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def ids_in_state(self, state: str) -> builtins.list[str]:
        return [r[0] for r in self._read("SELECT id FROM jobs WHERE state = ? ORDER BY created_at", (state,))]

    def incr_metrics(self, increments: dict[str, float]) -> None:
        with self._tx() as db:
            for name, value in increments.items():
                db.execute(
                    "INSERT INTO metrics (name, value) VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    (name, float(value)),
                )

    def metrics(self) -> dict[str, float]:
        return {name: float(v) for name, v in self._read("SELECT name, value FROM metrics")}

    def heartbeat(self, worker_name: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO heartbeats (name, at) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET at = excluded.at",
                (worker_name, time.time()),
            )

    def heartbeats(self) -> dict[str, float]:
        return {name: float(at) for name, at in self._read("SELECT name, at FROM heartbeats")}

    def ping(self) -> None:
        self._read("SELECT 1")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


# ---------------------------------------------------------------------------------------------
# Redis (with a broker)
# ---------------------------------------------------------------------------------------------


class RedisJobStore(JobStore):
    """Records as JSON strings under ``<prefix>job:<id>``; one sorted set per state for listing.

    Compare-and-set uses WATCH/MULTI, so concurrent workers and the API never lose an update.
    Durability across a Redis restart is Redis's own (enable AOF or RDB snapshots in production).
    """

    def __init__(self, url: str, prefix: str = "fprotoseg:") -> None:
        import redis

        self._redis_errors = (redis.RedisError, OSError)
        self._watch_error = redis.WatchError
        self.client = redis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )
        self.prefix = prefix

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except self._redis_errors as exc:
            raise JobStoreError(f"job store (Redis) unavailable: {exc}") from None

    def _idem_key(self, tenant: str, key: str) -> str:
        return self._k("idem", tenant, key)  # tenant names hold no ':' (TENANT_PATTERN)

    def _tenant_key(self, tenant: str, state: str | None = None) -> str:
        return self._k("tenant", tenant, "state", state) if state else self._k("tenant", tenant, "jobs")

    def create(self, record: JobRecord) -> JobRecord:
        with self._errors():
            if record.idempotency_key:
                idem = self._idem_key(record.tenant, record.idempotency_key)
                if not self.client.set(idem, record.id, nx=True):
                    existing = self.client.get(idem)
                    raise DuplicateJobError(existing.decode() if existing else "?")
            pipe = self.client.pipeline(transaction=True)
            pipe.set(self._k("job", record.id), _encode(record))
            pipe.zadd(self._k("jobs"), {record.id: record.created_at})
            pipe.zadd(self._k("state", record.state), {record.id: record.created_at})
            pipe.zadd(self._tenant_key(record.tenant), {record.id: record.created_at})
            pipe.zadd(self._tenant_key(record.tenant, record.state), {record.id: record.created_at})
            if record.upload_sha256:
                pipe.zadd(
                    self._k("content", record.tenant, record.upload_sha256, record.params_hash),
                    {record.id: record.created_at},
                )
            pipe.execute()
        return record

    def _get_many(self, ids: builtins.list[bytes] | builtins.list[str]) -> builtins.list[JobRecord]:
        if not ids:
            return []
        keys = [self._k("job", i.decode() if isinstance(i, bytes) else i) for i in ids]
        return [JobRecord.from_dict(json.loads(raw)) for raw in self.client.mget(keys) if raw]

    def get(self, job_id: str) -> JobRecord | None:
        with self._errors():
            raw = self.client.get(self._k("job", job_id))
        return JobRecord.from_dict(json.loads(raw)) if raw else None

    def list(
        self, *, limit: int, offset: int = 0, state: str | None = None, tenant: str | None = None
    ) -> tuple[builtins.list[JobRecord], int]:
        if tenant is not None:
            key = self._tenant_key(tenant, state)
        else:
            key = self._k("state", state) if state else self._k("jobs")
        with self._errors():
            ids = self.client.zrevrange(key, offset, offset + limit - 1)
            return self._get_many(ids), int(self.client.zcard(key))

    def find_by_idempotency_key(self, key: str, tenant: str = "") -> JobRecord | None:
        with self._errors():
            job_id = self.client.get(self._idem_key(tenant, key))
        return self.get(job_id.decode()) if job_id else None

    def find_by_content(self, sha256: str, params_hash: str, tenant: str = "") -> JobRecord | None:
        with self._errors():
            ids = self.client.zrevrange(self._k("content", tenant, sha256, params_hash), 0, 20)
            for rec in self._get_many(ids):
                if rec.state not in (FAILED, CANCELLED):
                    return rec
        return None

    def release_idempotency_key(self, job_id: str) -> None:
        rec = self._modify(job_id, STATES, None, {"idempotency_released": True})
        if rec is None or not rec.idempotency_key:
            return
        idem = self._idem_key(rec.tenant, rec.idempotency_key)
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            try:  # only if the key still names this job (a newer job may own it already)
                pipe.watch(idem)
                if pipe.get(idem) == job_id.encode():
                    pipe.multi()
                    pipe.delete(idem)
                    pipe.execute()
                else:
                    pipe.unwatch()
            except self._watch_error:
                pass

    def delete(self, job_id: str) -> None:
        rec = self.get(job_id)
        if rec is None:
            return
        with self._errors():
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._k("job", job_id))
            pipe.zrem(self._k("jobs"), job_id)
            pipe.zrem(self._k("state", rec.state), job_id)
            pipe.zrem(self._tenant_key(rec.tenant), job_id)
            pipe.zrem(self._tenant_key(rec.tenant, rec.state), job_id)
            pipe.zrem(self._k("content", rec.tenant, rec.upload_sha256, rec.params_hash), job_id)
            pipe.zrem(self._k("callbacks"), job_id)
            pipe.execute()
        if rec.idempotency_key and not rec.idempotency_released:
            with self._errors():
                idem = self._idem_key(rec.tenant, rec.idempotency_key)
                if self.client.get(idem) == job_id.encode():
                    self.client.delete(idem)

    def finished_before(self, ts: float, limit: int = 500) -> builtins.list[JobRecord]:
        found: builtins.list[JobRecord] = []
        with self._errors():
            for state in sorted(TERMINAL_STATES):
                ids = self.client.zrange(self._k("state", state), 0, -1)
                for i in range(0, len(ids), 200):
                    for rec in self._get_many(ids[i : i + 200]):
                        if rec.finished_at is not None and rec.finished_at < ts:
                            found.append(rec)
                            if len(found) >= limit:
                                return found
        return found

    def _modify(
        self,
        job_id: str,
        allowed: Iterable[str],
        to_state: str | None,
        changes: dict[str, Any],
        where: Callable[[JobRecord], bool] | None = None,
    ) -> JobRecord | None:
        allowed = tuple(allowed)
        key = self._k("job", job_id)
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if not raw:
                        pipe.unwatch()
                        return None
                    rec = JobRecord.from_dict(json.loads(raw))
                    if rec.state not in allowed or (where is not None and not where(rec)):
                        pipe.unwatch()
                        return None
                    old_state = rec.state
                    new = rec.changed(changes, to_state)
                    pipe.multi()
                    pipe.set(key, _encode(new))
                    if new.state != old_state:
                        pipe.zrem(self._k("state", old_state), job_id)
                        pipe.zadd(self._k("state", new.state), {job_id: new.created_at})
                        pipe.zrem(self._tenant_key(new.tenant, old_state), job_id)
                        pipe.zadd(self._tenant_key(new.tenant, new.state), {job_id: new.created_at})
                    pipe.execute()
                    return new
                except self._watch_error:
                    continue

    def schedule_callback(self, job_id: str, due_at: float) -> None:
        with self._errors():
            self.client.zadd(self._k("callbacks"), {job_id: due_at})

    def due_callbacks(self, now: float, limit: int = 20) -> builtins.list[str]:
        with self._errors():
            ids = self.client.zrangebyscore(self._k("callbacks"), "-inf", now, start=0, num=limit)
        return [i.decode() for i in ids]

    def claim_callback(self, job_id: str, now: float, lease_s: float) -> bool:
        key = self._k("callbacks")
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                due = pipe.zscore(key, job_id)
                if due is None or float(due) > now:
                    pipe.unwatch()
                    return False
                pipe.multi()
                pipe.zadd(key, {job_id: now + lease_s})
                pipe.execute()
                return True
            except self._watch_error:
                return False  # someone else changed the outbox meanwhile: let them have it

    def unschedule_callback(self, job_id: str) -> None:
        with self._errors():
            self.client.zrem(self._k("callbacks"), job_id)

    def counts_by_state(self) -> dict[str, int]:
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            for s in STATES:
                pipe.zcard(self._k("state", s))
            return {s: int(n) for s, n in zip(STATES, pipe.execute(), strict=True)}

    def oldest_queued(self) -> JobRecord | None:
        with self._errors():
            ids = self.client.zrange(self._k("state", QUEUED), 0, 0)
        recs = self._get_many(ids)
        return recs[0] if recs else None

    def ids_in_state(self, state: str) -> builtins.list[str]:
        with self._errors():
            return [i.decode() for i in self.client.zrange(self._k("state", state), 0, -1)]

    def incr_metrics(self, increments: dict[str, float]) -> None:
        with self._errors():
            pipe = self.client.pipeline(transaction=True)
            for name, value in increments.items():
                pipe.hincrbyfloat(self._k("metrics"), name, float(value))
            pipe.execute()

    def metrics(self) -> dict[str, float]:
        with self._errors():
            raw = self.client.hgetall(self._k("metrics"))
        return {k.decode(): float(v) for k, v in raw.items()}

    def heartbeat(self, worker_name: str) -> None:
        with self._errors():
            self.client.hset(self._k("heartbeats"), worker_name, time.time())

    def heartbeats(self) -> dict[str, float]:
        with self._errors():
            raw = self.client.hgetall(self._k("heartbeats"))
        return {k.decode(): float(v) for k, v in raw.items()}

    def ping(self) -> None:
        with self._errors():
            self.client.ping()

    def close(self) -> None:
        self.client.close()


def open_jobstore(settings: Settings) -> JobStore:
    """Redis when FPROTOSEG_BROKER_URL is set, else the SQLite file in the data dir."""
    if settings.broker_url:
        return RedisJobStore(settings.broker_url, settings.redis_key_prefix)
    return SqliteJobStore(settings.sqlite_path)
