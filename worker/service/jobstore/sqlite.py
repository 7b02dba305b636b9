"""The SQLite job store: the embedded default, one file in the data dir shared by the API and the
local worker process (which also takes its queued jobs from it: :class:`EmbeddedQueue`)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fprotoseg.worker.errors import DuplicateJobError, JobStoreError
from fprotoseg.worker.service.jobstore.base import EmbeddedQueue, JobRecord, JobStore, Where, encode_record
from fprotoseg.worker.service.states import CANCELLED, FAILED, QUEUED, STATES, TERMINAL_STATES
from fprotoseg.worker.service.storage import give_back_sqlite_journal, is_out_of_space

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
_SQLITE_MIGRATED_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_tenant_created ON jobs(tenant, created_at);
CREATE INDEX IF NOT EXISTS jobs_tenant_state_created ON jobs(tenant, state, created_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_content_claim ON jobs(content_key);
"""
# A live job of an older version claims its content too, unless another live one holds it already.
_SQLITE_CLAIM_EXISTING = """
UPDATE OR IGNORE jobs SET content_key = tenant || char(31) || sha256 || char(31) || params_hash
WHERE content_key IS NULL AND sha256 != '' AND state NOT IN ('failed', 'cancelled')
"""


_BUSY_TIMEOUT_S = 30.0


def _enter_wal(db: sqlite3.Connection) -> None:
    """Put the file in WAL mode, waiting for other openers as long as any write would.

    SQLite answers "database is locked" at once, without its busy handler, when two connections
    switch a new file's journal mode together (the API and the worker starting side by side, or
    threads opening the store): so the switch is retried here until the same timeout.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    pause_s = 0.005
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise
            time.sleep(pause_s)
            pause_s = min(pause_s * 2, 0.2)


def _scoped_key(tenant: str, key: str) -> str:
    """Idempotency keys are per tenant: the same key from two tenants names two jobs."""
    return f"{tenant}\x1f{key}"


def _content_key(rec: JobRecord) -> str | None:
    """The claim of a job that can still finish on its bytes and parameters (one per tenant):
    a failed or cancelled job gives it up, so a resubmission makes a new job."""
    if not rec.upload_sha256 or rec.state in (FAILED, CANCELLED):
        return None
    return f"{rec.tenant}\x1f{rec.upload_sha256}\x1f{rec.params_hash}"


class SqliteJobStore(JobStore, EmbeddedQueue):
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
            self._migrate(db)
            for path in (self.path, *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm"))):
                if path.exists() and path.stat().st_uid == os.getuid():
                    path.chmod(0o600)  # patient data: private whatever the umask was
        except (OSError, sqlite3.Error) as exc:
            raise JobStoreError(f"cannot open the job store: {exc}") from None

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        """Bring a file of an older version up to date, in one transaction: the API and the
        embedded worker open the same file at the same time."""
        db.execute("BEGIN IMMEDIATE")  # the schema too: a deferred CREATE on a stale snapshot fails at once
        try:
            for statement in _SQLITE_SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            if "tenant" not in columns:
                db.execute("ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT ''")
            if "content_key" not in columns:  # UNIQUE through jobs_content_claim (ALTER cannot add one)
                db.execute("ALTER TABLE jobs ADD COLUMN content_key TEXT")
            for statement in _SQLITE_MIGRATED_INDEXES.split(";"):
                if statement.strip():
                    db.execute(statement)
            if "content_key" not in columns:
                db.execute(_SQLITE_CLAIM_EXISTING)  # after the index: OR IGNORE skips a second claim
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=True)
        _enter_wal(db)
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

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
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
        record = encode_record(rec)
        return (rec.state, rec.created_at, rec.upload_sha256, rec.params_hash, idem, rec.tenant, record)

    def create(self, record: JobRecord) -> JobRecord:
        """Insert the record; the UNIQUE idempotency key and content claim make a concurrent
        second job on the same key, or on the same bytes and parameters, a DuplicateJobError."""
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO jobs (state, created_at, sha256, params_hash, idempotency_key, tenant, "
                    "record, content_key, id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*self._row_args(record), _content_key(record), record.id),
                )
        except JobStoreError:
            if record.idempotency_key:
                existing = self.find_by_idempotency_key(record.idempotency_key, record.tenant)
                if existing is not None:
                    raise DuplicateJobError(existing.id) from None
            claim = _content_key(record)
            rows = self._read("SELECT id FROM jobs WHERE content_key = ?", (claim,)) if claim else []
            if rows:
                raise DuplicateJobError(rows[0][0]) from None
            raise
        return record

    def create_many(self, records: Sequence[JobRecord]) -> list[JobRecord]:
        """All records in ONE transaction (a cohort of 1,000 slides is one fsync, not 1,000): each
        INSERT OR IGNORE, and a record the content claim refused answered by the claim's holder
        (read in the same transaction, so it cannot vanish in between)."""
        if any(r.idempotency_key for r in records):
            raise ValueError("create_many takes records without an Idempotency-Key")
        if not records:
            return []
        out: list[JobRecord] = []
        with self._tx() as db:
            for record in records:
                cur = db.execute(
                    "INSERT OR IGNORE INTO jobs (state, created_at, sha256, params_hash, idempotency_key, "
                    "tenant, record, content_key, id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (*self._row_args(record), _content_key(record), record.id),
                )
                if cur.rowcount == 1:
                    out.append(record)
                    continue
                claim = _content_key(record)
                row = (
                    db.execute("SELECT record FROM jobs WHERE content_key = ?", (claim,)).fetchone()
                    if claim
                    else None
                )
                if row is None:
                    raise JobStoreError(f"job store: job {record.id} could not be inserted")
                out.append(JobRecord.from_dict(json.loads(row[0])))
        return out

    def find_many_by_content(
        self, keys: Sequence[tuple[str, str]], tenant: str = ""
    ) -> dict[tuple[str, str], JobRecord]:
        """Through the content claims (unique, held only by jobs that can still finish): one
        indexed query per 500 pairs."""
        claims = {f"{tenant}\x1f{sha}\x1f{phash}": (sha, phash) for sha, phash in keys if sha}
        names = list(claims)
        found: dict[tuple[str, str], JobRecord] = {}
        for start in range(0, len(names), 500):
            chunk = names[start : start + 500]
            rows = self._read(
                f"SELECT content_key, record FROM jobs WHERE content_key IN ({','.join('?' * len(chunk))})",
                tuple(chunk),
            )
            for claim, raw in rows:
                found[claims[claim]] = JobRecord.from_dict(json.loads(raw))
        return found

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return JobRecord.from_dict(json.loads(rows[0][0])) if rows else None

    def page(
        self, *, limit: int, offset: int = 0, state: str | None = None, tenant: str | None = None
    ) -> tuple[list[JobRecord], int]:
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

    def finished_before(self, ts: float, limit: int = 500) -> list[JobRecord]:
        rows = self._read(
            "SELECT record FROM jobs WHERE state IN (?, ?, ?) "
            "AND json_extract(record, '$.finished_at') < ? LIMIT ?",
            (*sorted(TERMINAL_STATES), ts, int(limit)),
        )
        return [JobRecord.from_dict(json.loads(r[0])) for r in rows]

    def _modify(
        self, job_id: str, allowed: Iterable[str], to_state: str | None, changes: dict[str, Any],
        where: Where | None = None,
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
            # the content claim is given up when the job fails or is cancelled, never taken later
            # (two live jobs of an older version may share content: neither may then fail to update)
            db.execute(
                "UPDATE jobs SET state = ?, created_at = ?, sha256 = ?, params_hash = ?, "
                "idempotency_key = ?, tenant = ?, record = ?, "
                "content_key = CASE WHEN ? THEN content_key ELSE NULL END WHERE id = ?",
                (*self._row_args(rec), _content_key(rec) is not None, job_id),
            )
            return rec

    def schedule_callback(self, job_id: str, due_at: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO callbacks (job_id, due_at) VALUES (?, ?) "
                "ON CONFLICT(job_id) DO UPDATE SET due_at = excluded.due_at",
                (job_id, due_at),
            )

    def due_callbacks(self, now: float, limit: int = 20) -> list[str]:
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

    def ids_in_state(self, state: str) -> list[str]:
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
