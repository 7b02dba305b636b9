"""Cohorts: many slides in one request, one job per slide, one answer and one callback for all.

Why a cohort is only a list of jobs: each slide is an ordinary job (deduplicated per tenant like
a single submission, listed by GET /jobs, its results downloadable), so nothing in the workers
changes and one slide's failure never touches the others. The cohort adds what a study needs:
counts per state, one table of per-slide areas (:mod:`fprotoseg.worker.wsi.cohort_table`), and
one callback when every slide has ended.

A cohort is ``running`` until every member job is terminal, then ``ended`` (a compare-and-set:
exactly once, whichever API process or request sees it first). The :class:`CohortSweeper` thread
of each API process ends cohorts and delivers their callbacks (signed like a job's, retried with
the same back-off); a claim pushes the next attempt ``lease`` seconds on, so two processes never
post the same attempt. Cheap to import: no torch, no FastAPI.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from fprotoseg.worker.errors import JobStoreError
from fprotoseg.worker.service.callbacks import encode_payload, post_once, signing_secret
from fprotoseg.worker.service.cohortstore import (
    COHORT_ENDED,
    COHORT_RUNNING,
    CohortRecord,
    CohortStore,
)
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.lifecycle import cancel_job
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import CANCELLED, QUEUED, STATES, SUCCEEDED, TERMINAL_STATES
from fprotoseg.worker.wsi.cohort_table import CohortRow
from fprotoseg.worker.wsi.result_files import STATS_NAME, results_complete

log = logging.getLogger(__name__)

MAX_COHORT_SLIDES = 1000
# a member job that retention (or an operator) removed: counted, and terminal
DELETED = "deleted"
ID_COLUMNS = ("job_id", "external_id", "filename", "sha256")


def member_jobs(store: JobStore, cohort: CohortRecord) -> list[tuple[str, str | None, JobRecord | None]]:
    """(job id, external id, the job or None when it is gone), in the order the slides were sent."""
    return [(m.job_id, m.external_id, store.get(m.job_id)) for m in cohort.members]


def counts(jobs: Sequence[JobRecord | None]) -> dict[str, int]:
    """Jobs per state (every state named, zeros included; ``deleted`` only when there are any)."""
    tally: dict[str, int] = dict.fromkeys(STATES, 0)
    for job in jobs:
        key = job.state if job is not None else DELETED
        tally[key] = tally.get(key, 0) + 1
    return tally


def all_ended(jobs: Sequence[JobRecord | None]) -> bool:
    return all(job is None or job.state in TERMINAL_STATES for job in jobs)


def settle(cohorts: CohortStore, cohort: CohortRecord, jobs: Sequence[JobRecord | None]) -> CohortRecord:
    """End the cohort if every job has ended (once: compare-and-set), queuing its callback."""
    if cohort.state != COHORT_RUNNING or not all_ended(jobs):
        return cohort
    now = time.time()
    changes: dict[str, Any] = {"state": COHORT_ENDED, "ended_at": now}
    if cohort.callback_url:
        changes.update(callback_status="pending", callback_due_at=now)
    ended = cohorts.modify(cohort.id, lambda r: r.state == COHORT_RUNNING, **changes)
    if ended is None:  # another process ended it first
        return cohorts.get(cohort.id) or cohort
    log.info("cohort %s: ended (%s)", cohort.id, counts(jobs))
    return ended


def cancel_not_started(settings: Settings, store: JobStore, cohort: CohortRecord) -> int:
    """Cancel every member job still queued (running ones finish: their work is mostly done);
    returns how many this call cancelled. A job shared with another submission (deduplicated) is
    cancelled for it too, as DELETE /jobs/{id} would."""
    cancelled = 0
    for member in cohort.members:
        before = store.get(member.job_id)
        if before is None or before.state != QUEUED:
            continue
        after = cancel_job(store, settings, member.job_id, where=lambda r: r.state == QUEUED)
        cancelled += after is not None and after.state == CANCELLED
    return cancelled


def stats_rows(
    settings: Settings, jobs: Sequence[tuple[str, str | None, JobRecord | None]]
) -> list[CohortRow]:
    """One table row per member job, with its stats.json once it has succeeded."""
    rows = []
    for job_id, external_id, job in jobs:
        ids = {
            "job_id": job_id,
            "external_id": external_id or "",
            "filename": job.filename if job is not None else "",
            "sha256": job.upload_sha256 if job is not None else "",
        }
        if job is None:
            rows.append(CohortRow(ids, DELETED))
            continue
        stats = None
        result_dir = settings.result_dir(job_id)
        if job.state == SUCCEEDED and results_complete(result_dir):
            try:
                stats = json.loads((result_dir / STATS_NAME).read_text())
            except (OSError, ValueError):
                stats = None
        rows.append(CohortRow(ids, job.state, job.error_code or "", job.error_message or "", stats))
    return rows


def cohort_links(base_url: str, cohort_id: str) -> dict[str, str]:
    """The cohort's own URL and its two tables (FPROTOSEG_PUBLIC_URL or the request's base)."""
    url = f"{base_url.rstrip('/')}/cohorts/{cohort_id}"
    return {"self": url, "stats_csv": f"{url}/stats.csv", "stats_json": f"{url}/stats.json"}


def callback_payload(settings: Settings, cohort: CohortRecord, store: JobStore) -> dict[str, Any]:
    """The JSON body POSTed once when the whole cohort has ended."""
    jobs = member_jobs(store, cohort)
    return {
        "cohort_id": cohort.id,
        "state": cohort.state,
        "ended_at": cohort.ended_at,
        "counts": counts([j for _, _, j in jobs]),
        "jobs": [
            {
                "job_id": job_id,
                "external_id": external_id,
                "state": job.state if job is not None else DELETED,
                "error": {"code": job.error_code, "message": job.error_message}
                if job is not None and job.error_code
                else None,
            }
            for job_id, external_id, job in jobs
        ],
        "links": cohort_links(settings.public_url or "", cohort.id),
    }


def deliver_cohort_callbacks(settings: Settings, cohorts: CohortStore, store: JobStore) -> int:
    """One attempt per due cohort callback; failures back off like a job's. Returns attempts made."""
    made = 0
    now = time.time()
    lease_s = settings.callback_timeout_s + 30.0
    for cohort_id in cohorts.callback_ids():
        claimed = cohorts.modify(
            cohort_id,
            lambda r: r.callback_status == "pending" and (r.callback_due_at or 0.0) <= now,
            callback_due_at=now + lease_s,
        )
        if claimed is None or not claimed.callback_url:
            continue
        made += 1
        attempt = claimed.callback_attempts + 1
        outcome = post_once(
            claimed.callback_url,
            encode_payload(callback_payload(settings, claimed, store)),
            secret=signing_secret(settings),
            timeout_s=settings.callback_timeout_s,
            allowed_hosts=settings.callback_allowed_hosts,
        )
        if outcome == "retry" and attempt < settings.callback_attempts:
            due = time.time() + settings.callback_backoff_s * 2 ** (attempt - 1)
            cohorts.modify(cohort_id, lambda r: True, callback_attempts=attempt, callback_due_at=due)
            continue
        status = "delivered" if outcome == "delivered" else "failed"
        cohorts.modify(
            cohort_id,
            lambda r: True,
            callback_status=status,
            callback_attempts=attempt,
            callback_due_at=None,
        )
        log.info("cohort %s: callback %s after %d attempt(s)", cohort_id, status, attempt)
    return made


def sweep(settings: Settings, cohorts: CohortStore, store: JobStore) -> None:
    """End every cohort whose jobs have all ended, then deliver due cohort callbacks."""
    for cohort_id in cohorts.running_ids():
        cohort = cohorts.get(cohort_id)
        if cohort is not None:
            settle(cohorts, cohort, [j for _, _, j in member_jobs(store, cohort)])
    deliver_cohort_callbacks(settings, cohorts, store)


class CohortSweeper:
    """A daemon thread of the API process running :func:`sweep` every ``interval_s``."""

    def __init__(
        self, settings: Settings, cohorts: CohortStore, store: JobStore, interval_s: float = 1.0
    ) -> None:
        self.settings, self.cohorts, self.store, self.interval_s = settings, cohorts, store, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cohort-sweeper", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                sweep(self.settings, self.cohorts, self.store)
            except JobStoreError as exc:
                log.warning("cohort sweep skipped: %s", exc.message)
            except Exception:  # never let housekeeping die
                log.exception("cohort sweep failed")

    def start(self) -> CohortSweeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
