"""The job store's interface and record: what every backend stores and the API and workers use.

A job record is the single source of truth for a job's state (queued -> running -> succeeded |
failed | cancelled), progress, stage, timestamps and error. Every state change is a
compare-and-set (``transition``), so a redelivered or duplicated Celery message can never move a
finished job again: that is what makes "succeeded exactly once" hold after a worker is killed.
"""

from __future__ import annotations

import json
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from fprotoseg.worker.errors import DuplicateJobError
from fprotoseg.worker.service.states import (
    CANCELLED,
    QUEUED,
    RUNNING,
    STATES,
    TERMINAL_STATES,
    JobState,
)

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
    qc_policy: str | None = None  # warn | refuse; None = the deployment's FPROTOSEG_QC_POLICY
    outputs: str | None = None  # optional outputs asked for: "probabilities" (probabilities.ome.tiff)
    qc: dict[str, Any] | None = None  # slide QC summary once succeeded (stats.json "qc")
    slide_uri: str | None = None  # file:// or s3:// when the slide was named, not uploaded
    roi: dict[str, Any] | None = None  # region of interest: a GeoJSON MultiPolygon, level-0 px
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


# a condition on the record a compare-and-set also requires (e.g. "still the same attempt")
Where = Callable[[JobRecord], bool]


class JobStore(ABC):
    """What the API, the embedded worker and the Celery workers need from job storage."""

    @abstractmethod
    def create(self, record: JobRecord) -> JobRecord:
        """Insert a new record; DuplicateJobError (naming the job that has it) if its idempotency
        key, or its tenant + slide sha256 + parameters while that job can still finish, is taken."""

    def create_many(self, records: Sequence[JobRecord]) -> list[JobRecord]:
        """Insert many new records without an Idempotency-Key (a cohort's jobs) as one write where
        the backend can: for each, the record itself, or the live job that holds its content
        claim already (a concurrent submission, or an earlier record of the same call), exactly
        as :meth:`create`'s DuplicateJobError names it. This default creates them one by one."""
        out: list[JobRecord] = []
        for record in records:
            try:
                out.append(self.create(record))
            except DuplicateJobError as dup:
                winner = self.get(dup.existing_id)
                if winner is None:
                    raise
                out.append(winner)
        return out

    def find_many_by_content(
        self, keys: Sequence[tuple[str, str]], tenant: str = ""
    ) -> dict[tuple[str, str], JobRecord]:
        """:meth:`find_by_content` for many (sha256, params hash) pairs at once: the pairs with a
        job that is not failed/cancelled. This default asks one by one."""
        found = {}
        for sha256, phash in dict.fromkeys(keys):
            rec = self.find_by_content(sha256, phash, tenant)
            if rec is not None:
                found[(sha256, phash)] = rec
        return found

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def page(
        self, *, limit: int, offset: int = 0, state: str | None = None, tenant: str | None = None
    ) -> tuple[list[JobRecord], int]:
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
    def finished_before(self, ts: float, limit: int = 500) -> list[JobRecord]:
        """Terminal jobs whose ``finished_at`` is older than ``ts``."""

    @abstractmethod
    def _modify(
        self, job_id: str, allowed: Iterable[str], to_state: str | None, changes: dict[str, Any],
        where: Where | None = None,
    ) -> JobRecord | None:
        """Atomically apply ``changes`` (and ``to_state`` if given) when the state is in ``allowed``
        (and ``where(record)`` holds, if given)."""

    # --- callback outbox: which finished jobs still owe their callback, and when to try next ---
    @abstractmethod
    def schedule_callback(self, job_id: str, due_at: float) -> None: ...

    @abstractmethod
    def due_callbacks(self, now: float, limit: int = 20) -> list[str]: ...

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
        where: Where | None = None,
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
    def ids_in_state(self, state: str) -> list[str]: ...

    @abstractmethod
    def incr_metrics(self, increments: dict[str, float]) -> None:
        """Add to durable counters (job durations, tiles) that /metrics reads."""

    @abstractmethod
    def metrics(self) -> dict[str, float]: ...

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


@runtime_checkable
class EmbeddedQueue(Protocol):
    """What only the embedded worker and its dispatcher need: the store is their queue and their
    worker registry (with a broker, Celery is both, so the Redis store has none of this)."""

    def oldest_queued(self) -> JobRecord | None:
        """The next job for the embedded worker (first in, first out)."""

    def heartbeat(self, worker_name: str) -> None:
        """The embedded worker ``worker_name`` is alive now."""

    def heartbeats(self) -> dict[str, float]:
        """worker name -> UNIX time of its last heartbeat."""


def encode_record(record: JobRecord) -> str:
    return json.dumps(record.to_dict(), separators=(",", ":"))


