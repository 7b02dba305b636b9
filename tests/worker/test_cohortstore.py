"""The cohort store on both backends (a SQLite file, the real Redis at 127.0.0.1:6379): records
round-trip, and racing threads end a cohort exactly once and claim its callback exactly once."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fprotoseg.worker.service.cohorts import counts, settle
from fprotoseg.worker.service.cohortstore import CohortMember, CohortRecord, CohortStore, open_cohort_store
from fprotoseg.worker.service.jobstore import JobRecord, JobStore, RedisJobStore, SqliteJobStore
from tests.app.live import redis_url_for_tests


@pytest.fixture(params=["sqlite", "redis"])
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[JobStore, CohortStore]]:
    if request.param == "sqlite":
        jobs: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite")
        yield jobs, open_cohort_store(jobs)
        return
    with redis_url_for_tests(tmp_path) as (url, prefix):
        jobs = RedisJobStore(url, prefix)
        yield jobs, open_cohort_store(jobs)
        jobs.close()


def test_settle_races_end_a_cohort_once(stores: tuple[JobStore, CohortStore]) -> None:
    jobs, cohorts = stores
    for i, state in enumerate(("succeeded", "failed", "queued")):
        jobs.create(JobRecord(id=f"job-{i}", state=state, tenant="lab"))
    cohort = cohorts.create(
        CohortRecord(
            id="c1", tenant="lab", callback_url="http://127.0.0.1:1/hook",
            members=[CohortMember(f"job-{i}", f"EXT-{i}") for i in range(3)],
        )
    )
    assert cohorts.get("c1") == cohort and cohorts.running_ids() == ["c1"]
    members = [jobs.get(m.job_id) for m in cohort.members]
    assert counts(members)["queued"] == 1
    assert settle(cohorts, cohort, members).state == "running"  # a job is still queued

    jobs.transition("job-2", "cancelled", ["queued"], finished_at=time.time())
    members = [jobs.get(m.job_id) for m in cohort.members]
    ended: list[str] = []
    start = threading.Barrier(8)

    def racer() -> None:
        start.wait()
        fresh = cohorts.get("c1")
        assert fresh is not None
        before = fresh.state
        after = settle(cohorts, fresh, members)
        if before == "running" and after.state == "ended" and after.ended_at is not None:
            ended.append(str(after.ended_at))

    threads = [threading.Thread(target=racer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = cohorts.get("c1")
    assert final is not None and final.state == "ended" and final.callback_status == "pending"
    assert len(set(ended)) == 1  # every racer saw the same, single end
    assert cohorts.running_ids() == [] and cohorts.callback_ids() == ["c1"]

    # the delivery claim: one winner among racing processes
    now = time.time()
    wins: list[bool] = []
    start2 = threading.Barrier(8)

    def claimer() -> None:
        start2.wait()
        claimed = cohorts.modify(
            "c1",
            lambda r: r.callback_status == "pending" and (r.callback_due_at or 0.0) <= now,
            callback_due_at=now + 60,
        )
        wins.append(claimed is not None)

    threads = [threading.Thread(target=claimer) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1
    cohorts.modify("c1", lambda r: True, callback_status="delivered")
    assert cohorts.callback_ids() == []
    cohorts.delete("c1")
    assert cohorts.get("c1") is None


def test_an_unreachable_redis_is_a_job_store_error_naming_the_cohort_store() -> None:
    """The cohort store maps Redis faults through the job store's one mapping: a refused
    connection (a port where nothing listens) is a JobStoreError that names the cohort store."""
    import socket

    from fprotoseg.worker.errors import JobStoreError

    with socket.socket() as probe:  # a free port, closed again before the store connects
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cohorts = open_cohort_store(RedisJobStore(f"redis://127.0.0.1:{port}/0", "fprotoseg-test-down:"))
    with pytest.raises(JobStoreError, match=r"^cohort store \(Redis\) unavailable: "):
        cohorts.get("c1")
    with pytest.raises(JobStoreError, match=r"^cohort store \(Redis\) unavailable: "):
        cohorts.running_ids()
