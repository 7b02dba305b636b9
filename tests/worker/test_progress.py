"""JobProgress against a real SQLite job store: what a LIMS polling the job sees after each batch."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from fprotoseg.worker.service.jobstore import JobRecord, SqliteJobStore
from fprotoseg.worker.service.runtime import JobProgress
from fprotoseg.worker.service.states import QUEUED, RUNNING


def _running_job(tmp_path: Path) -> tuple[SqliteJobStore, str]:
    store = SqliteJobStore(tmp_path / "jobs.sqlite")
    job_id = str(uuid.uuid4())
    store.create(JobRecord(id=job_id, upload_path=str(tmp_path / "slide.svs")))
    assert store.transition(job_id, RUNNING, [QUEUED], stage="loading model", progress=0.0)
    return store, job_id


def test_each_batch_is_written_even_inside_the_write_interval(tmp_path: Path) -> None:
    """Batches that finish faster than the interval: before, the second batch's count was
    dropped and the job showed the first batch's figure until inference ended."""
    store, job_id = _running_job(tmp_path)
    progress = JobProgress(store, job_id, interval_s=3600.0)
    total = 161
    shown = []
    for inferred in (0, 60, 120, 161):
        progress("inference", inferred, total)
        shown.append(store.get(job_id).progress)
    expected = [0.05 + 0.85 * n / total for n in (0, 60, 120, 161)]
    assert shown == pytest.approx(expected, abs=1e-4)


def test_small_steps_inside_the_interval_are_not_written(tmp_path: Path) -> None:
    """The rate stays bounded: tile-by-tile calls write once per ``step`` of progress."""
    store, job_id = _running_job(tmp_path)
    writes: list[float] = []
    real = store.progress

    def counting(job: str, stage: str, value: float) -> bool:
        writes.append(value)
        return real(job, stage, value)

    store.progress = counting  # type: ignore[method-assign]
    progress = JobProgress(store, job_id, interval_s=3600.0, step=0.02)
    for done in range(1001):
        progress("inference", done, 1000)
    assert 40 <= len(writes) <= 45, len(writes)  # 0.85 of progress in steps of 0.02, plus the first
    assert store.get(job_id).progress >= 0.88
