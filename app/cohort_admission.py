"""Admission of a cohort's slides in one go: what ``POST /cohorts`` does with up to 1,000 entries.

Why not ``admit_slide`` per entry: a cohort names a few slides many times (one slide per case of a
study, the same slides for several models or pixel sizes), and one by one each entry hashed and
sniffed its slide again, then took a store transaction and a broker connection of its own. Here:

1. each distinct ``file://`` slide is resolved, hashed and sniffed once
   (:func:`~fprotoseg.app.routes.segment.vet_slide`);
2. each entry becomes the job it would make alone (:func:`~fprotoseg.app.routes.segment.submission`:
   the same fields, the same ``params_hash``), so deduplication is exactly a single
   submission's: entries with the same slide bytes and parameters are one job, and a job of this
   tenant that can still finish is found again (:meth:`JobStore.find_many_by_content`, one query);
3. the new jobs, and the failed jobs of entries refused at admission, are written in ONE store
   transaction (:meth:`JobStore.create_many`; a concurrent submission of the same slide is
   answered with its job, as :class:`DuplicateJobError` does for one), then handed to the workers
   over one broker connection (:meth:`Dispatcher.submit_many`).

``s3://`` entries are fetched into a copy of their own per job, so they keep the one-by-one path.
What is refused for one entry (no such file, not a slide, outside the slide roots) is that entry's
failed job; a server-side outage (store, broker) fails the request with 503 like ``POST /segment``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from urllib.parse import unquote, urlsplit

from fastapi.concurrency import run_in_threadpool

from fprotoseg.app.auth import Principal
from fprotoseg.app.dispatch import Dispatcher
from fprotoseg.app.errors import Problem
from fprotoseg.app.reference import IncomingSlide, open_reference
from fprotoseg.app.routes.segment import _replayable, admit_slide, submission, vet_slide
from fprotoseg.app.routes.segment_models import SegmentReference
from fprotoseg.app.upload import client_filename
from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.errors import BrokerUnavailableError
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import FAILED, QUEUED
from fprotoseg.worker.wsi.validate import SlideFormat

__all__ = ["admit_cohort", "failed_record"]

log = logging.getLogger("fprotoseg.api")


@dataclass(frozen=True)
class _Vetted:
    upload: IncomingSlide
    fmt: SlideFormat


def failed_record(who: Principal, ref: SegmentReference, exc: FprotosegError) -> JobRecord:
    """An entry refused at admission, as a failed job: the cohort still has one job per entry,
    and the client sees why in the job, the table and the callback."""
    name = unquote(urlsplit(ref.slide_uri).path.rstrip("/").rsplit("/", 1)[-1])
    try:
        filename = client_filename(name)
    except Problem:  # too long, or control characters: the URI stays in the record
        filename = ""
    now = time.time()
    return JobRecord(
        id=str(uuid.uuid4()),
        state=FAILED,
        stage="failed",
        created_at=now,
        finished_at=now,
        error_code=str(exc.code),
        error_message=exc.message,
        slide_uri=ref.slide_uri,
        filename=filename,
        tenant=who.tenant,
        metadata=ref.client_metadata(),
        mpp=ref.mpp,
        model=ref.model,
        idempotency_released=True,
    )


def _entry_fault(exc: FprotosegError) -> FprotosegError:
    """The entry's own fault (4xx) is kept for its failed job; the server's (5xx) fails the request."""
    if exc.http_status >= 500:
        raise exc
    return exc


async def _vet(ref: SegmentReference, settings: Settings) -> _Vetted | FprotosegError:
    try:
        upload, fmt, _ = await vet_slide(await open_reference(ref, settings), settings)
    except FprotosegError as exc:
        return _entry_fault(exc)
    return _Vetted(upload, fmt)


def _settle(
    store: JobStore,
    settings: Settings,
    dispatcher: Dispatcher,
    who: Principal,
    candidates: dict[int, JobRecord],
    refused: list[JobRecord],
) -> tuple[dict[int, JobRecord], list[str]]:
    """(entry -> its job, ids of the jobs made now): existing jobs found, the rest created in one
    write. Runs in a worker thread: store calls block."""
    keys = [(c.upload_sha256, c.params_hash) for c in candidates.values()]
    found = store.find_many_by_content(keys, who.tenant)
    for key, rec in list(found.items()):  # one lost with its worker is ended (or requeued) first
        alive = _replayable(store, settings, dispatcher, rec)
        if alive is None:
            del found[key]
        else:
            found[key] = alive
    new: dict[tuple[str, str], JobRecord] = {}  # the first entry of each slide + parameters
    for candidate in candidates.values():
        key = (candidate.upload_sha256, candidate.params_hash)
        if key not in found and key not in new:
            new[key] = candidate
    written = store.create_many([*new.values(), *refused])[: len(new)]
    made = []
    for (key, asked), got in zip(new.items(), written, strict=True):
        found[key] = got  # ours, or the job of a concurrent submission that won the claim
        if got.id == asked.id:
            made.append(got.id)
    return {i: found[(c.upload_sha256, c.params_hash)] for i, c in candidates.items()}, made


def _unqueued(store: JobStore, job_ids: Sequence[str]) -> None:
    """Jobs the broker did not take: failed (never replayed), so a retry of the cohort makes them
    anew, as POST /segment does for one."""
    for job_id in job_ids:
        store.transition(
            job_id,
            FAILED,
            [QUEUED],
            stage="failed",
            error_code=BrokerUnavailableError.code,
            error_message="the job could not be queued (broker unreachable); submit the cohort again",
            finished_at=time.time(),
        )


async def admit_cohort(
    refs: Sequence[SegmentReference],
    model: str | None,
    who: Principal,
    settings: Settings,
    store: JobStore,
    dispatcher: Dispatcher,
) -> list[JobRecord]:
    """One job per entry, in the entries' order (entries with the same slide and parameters share
    it); see the module docstring. ``model``: the cohort's model, resolved once."""
    jobs: dict[int, JobRecord] = {}
    refused: dict[int, JobRecord] = {}
    candidates: dict[int, JobRecord] = {}
    vetted: dict[str, _Vetted | FprotosegError] = {}
    for index, ref in enumerate(refs):
        if urlsplit(ref.slide_uri).scheme.lower() != "file":  # s3://: a copy per job, one by one
            try:
                jobs[index], _ = await admit_slide(
                    await open_reference(ref, settings), who, None, settings, store, dispatcher
                )
            except FprotosegError as exc:
                refused[index] = failed_record(who, ref, _entry_fault(exc))
            continue
        if ref.slide_uri not in vetted:
            vetted[ref.slide_uri] = await _vet(ref, settings)
        slide = vetted[ref.slide_uri]
        if isinstance(slide, FprotosegError):
            refused[index] = failed_record(who, ref, slide)
            continue
        try:
            candidates[index] = submission(
                replace(slide.upload, request=ref), slide.fmt, who, None, settings, model
            )
        except FprotosegError as exc:
            refused[index] = failed_record(who, ref, _entry_fault(exc))
    settled, made = await run_in_threadpool(
        _settle, store, settings, dispatcher, who, candidates, list(refused.values())
    )
    jobs.update(settled)
    jobs.update(refused)
    unsent = await run_in_threadpool(dispatcher.submit_many, made)
    if unsent:
        await run_in_threadpool(_unqueued, store, unsent)
        raise BrokerUnavailableError(
            f"{len(unsent)} of the cohort's jobs could not be queued (broker unreachable); try again"
        )
    if made:
        log.info("cohort: %d entries, %d new jobs queued", len(refs), len(made))
    return [jobs[i] for i in range(len(refs))]
