"""Issue 22, item 8: the SQLite job store on a disk that fills up, caused for real on a small tmpfs.

The write-ahead log grew to SQLite's default of 1000 pages (4 MiB) between checkpoints and kept
its size; on a nearly full disk it took the last space, and from then on every write failed (the
job's progress, its ``disk_full``, the reaper's requeue), so the job stayed ``running`` for good."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.jobstore import JobRecord, SqliteJobStore
from fprotoseg.worker.service.states import FAILED, QUEUED, RUNNING
from tests.app.test_e2e_faults import tiny_tmpfs


def _wal(store_path: Path) -> int:
    wal = store_path.with_name(store_path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


def test_the_write_ahead_log_stays_small(tmp_path: Path) -> None:
    """A job's life of progress writes leaves a WAL file of a few hundred KiB, not MiBs."""
    path = tmp_path / "jobs.sqlite3"
    store = SqliteJobStore(path)
    rec = store.create(JobRecord(id="job-1"))
    assert store.transition(rec.id, RUNNING, [QUEUED]) is not None
    largest = 0
    for i in range(600):
        assert store.progress(rec.id, "inference", i / 600)
        largest = max(largest, _wal(path))
    assert largest <= 512 * 1024, f"the WAL grew to {largest} bytes"


def _fill(path: Path) -> Path:
    """Write a filler file until the file system refuses (ENOSPC)."""
    filler = path / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_a_full_disk_gives_back_the_log_so_the_job_can_still_end(tmp_path: Path) -> None:
    """The disk fills while a job runs: writes fail with "database or disk is full", the failed
    write gives back the write-ahead log, and the next write (the job's ``disk_full``) goes through."""
    with tiny_tmpfs(tmp_path / "small", "1200k") as small:
        path = small / "jobs.sqlite3"
        store = SqliteJobStore(path)
        rec = store.create(JobRecord(id="job-full", metadata={"pad": "x" * 2000}))
        assert store.transition(rec.id, RUNNING, [QUEUED]) is not None
        for i in range(40):  # a job's progress so far: the log holds pages
            store.progress(rec.id, "inference", i / 100)
        held = _wal(path)
        assert held > 0
        filler = _fill(small)
        refused = 0
        for i in range(200):  # the job goes on writing progress until the store refuses
            try:
                store.progress(rec.id, "inference", 0.4 + i / 1000)
            except JobStoreError as exc:
                assert "full" in exc.message
                refused += 1
                break
        assert refused == 1, "the store never filled"
        assert _wal(path) < held  # given back
        failed = store.transition(rec.id, FAILED, [RUNNING], error_code="disk_full", finished_at=time.time())
        assert failed is not None and failed.error_code == "disk_full"
        assert SqliteJobStore(path).get(rec.id).state == FAILED  # durable, seen by another connection
        filler.unlink()

