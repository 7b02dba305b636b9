"""The Redis job store, used when a broker is configured: records shared by the API and every
Celery worker, with compare-and-set by WATCH/MULTI."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fprotoseg.worker.errors import DuplicateJobError, JobStoreError
from fprotoseg.worker.service.jobstore.base import JobRecord, JobStore, Where, encode_record
from fprotoseg.worker.service.states import CANCELLED, FAILED, STATES, TERMINAL_STATES


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
        """A key under this store's prefix (the cohort store beside it keys its records here too)."""
        return self.prefix + ":".join(parts)

    @contextmanager
    def _errors(self, store: str = "job store") -> Iterator[None]:
        """A Redis or socket error as a JobStoreError naming ``store`` (the cohort store's too)."""
        try:
            yield
        except self._redis_errors as exc:
            raise JobStoreError(f"{store} (Redis) unavailable: {exc}") from None

    def _idem_key(self, tenant: str, key: str) -> str:
        return self._k("idem", tenant, key)  # tenant names hold no ':' (TENANT_PATTERN)

    def _tenant_key(self, tenant: str, state: str | None = None) -> str:
        return self._k("tenant", tenant, "state", state) if state else self._k("tenant", tenant, "jobs")

    def _claim_key(self, record: JobRecord) -> str | None:
        """The key naming the one job that can still finish on these bytes and parameters."""
        if not record.upload_sha256:
            return None
        return self._k("claim", record.tenant, record.upload_sha256, record.params_hash)

    def _live_owner(self, pipe: Any, claim: str | None) -> str | None:
        """The job a (WATCHed) claim names, if that job exists and is not failed or cancelled."""
        if claim is None:
            return None
        owner = pipe.get(claim)
        if not owner:
            return None
        raw = pipe.get(self._k("job", owner.decode()))
        if not raw or JobRecord.from_dict(json.loads(raw)).state in (FAILED, CANCELLED):
            return None  # a leftover of a failed create, or a job that can no longer finish
        return str(owner.decode())

    def create(self, record: JobRecord) -> JobRecord:
        """Claim the idempotency key and the content, and write the record and its indexes, in ONE
        transaction.

        Both claims are WATCHed, checked and then set inside MULTI, so of two concurrent requests
        with the same key, or with the same bytes and parameters, exactly one makes a job and the
        other gets DuplicateJobError naming it. A transaction that fails claims nothing, and a
        claim naming a missing, failed or cancelled job is free (a leftover, or a job that cannot
        finish: the retry makes a new job).
        """
        idem = self._idem_key(record.tenant, record.idempotency_key) if record.idempotency_key else None
        claim = self._claim_key(record)
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    if watched := [k for k in (idem, claim) if k is not None]:
                        pipe.watch(*watched)
                    if idem is not None:
                        owner = pipe.get(idem)
                        if owner and pipe.exists(self._k("job", owner.decode())):
                            pipe.unwatch()
                            raise DuplicateJobError(owner.decode())
                    if (holder := self._live_owner(pipe, claim)) is not None:
                        pipe.unwatch()
                        raise DuplicateJobError(holder)
                    pipe.multi()
                    if idem is not None:
                        pipe.set(idem, record.id)
                    if claim is not None:
                        pipe.set(claim, record.id)
                    self._queue_create(pipe, record)
                    pipe.execute()
                    return record
                except self._watch_error:
                    continue
                except self._redis_errors:
                    self._undo_create(record, idem)
                    raise

    def create_many(self, records: Sequence[JobRecord]) -> list[JobRecord]:
        """All records in ONE transaction (a cohort of 1,000 slides is two round trips to read the
        claims and one MULTI/EXEC, not 1,000 WATCH/MULTI/EXEC cycles).

        Every content claim is WATCHed and read with its holder; a claim held by a live job answers
        with that job, one taken earlier in this call with that record, and the rest are claimed and
        written inside MULTI. A concurrent change to any claim retries the whole batch, so the
        outcome is as if the records had been created one by one.
        """
        if any(r.idempotency_key for r in records):
            raise ValueError("create_many takes records without an Idempotency-Key")
        if not records:
            return []
        claims = [self._claim_key(r) for r in records]
        watched = sorted({c for c in claims if c is not None})
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            while True:
                created: list[JobRecord] = []
                try:
                    holders: dict[str, JobRecord] = {}  # claim -> the live job holding it
                    if watched:
                        pipe.watch(*watched)
                        values = pipe.mget(watched)
                        owners = {c: o.decode() for c, o in zip(watched, values, strict=True) if o}
                        ids = sorted(set(owners.values()))
                        raws = pipe.mget([self._k("job", i) for i in ids]) if ids else []
                        found = [JobRecord.from_dict(json.loads(raw)) for raw in raws if raw]
                        live = {r.id: r for r in found if r.state not in (FAILED, CANCELLED)}
                        holders = {c: live[o] for c, o in owners.items() if o in live}
                    out: list[JobRecord] = []
                    pipe.multi()
                    for record, claim in zip(records, claims, strict=True):
                        if claim is not None and claim in holders:
                            out.append(holders[claim])
                            continue
                        if claim is not None:
                            pipe.set(claim, record.id)
                            holders[claim] = record
                        self._queue_create(pipe, record)
                        created.append(record)
                        out.append(record)
                    pipe.execute()
                    return out
                except self._watch_error:
                    continue
                except self._redis_errors:
                    for record in created:
                        self._undo_create(record, None)
                    raise

    def find_many_by_content(
        self, keys: Sequence[tuple[str, str]], tenant: str = ""
    ) -> dict[tuple[str, str], JobRecord]:
        """Two round trips for any number of pairs: the content indexes in one pipeline, then
        every candidate record in one MGET."""
        pairs = list(dict.fromkeys(k for k in keys if k[0]))
        if not pairs:
            return {}
        with self._errors():
            pipe = self.client.pipeline(transaction=False)
            for sha256, phash in pairs:
                pipe.zrevrange(self._k("content", tenant, sha256, phash), 0, 20)
            candidates = pipe.execute()
        records = {r.id: r for r in self._get_many(sorted({i.decode() for ids in candidates for i in ids}))}
        found: dict[tuple[str, str], JobRecord] = {}
        for pair, ids in zip(pairs, candidates, strict=True):
            for raw_id in ids:
                rec = records.get(raw_id.decode())
                if rec is not None and rec.state not in (FAILED, CANCELLED):
                    found[pair] = rec
                    break
        return found

    def _queue_create(self, pipe: Any, record: JobRecord) -> None:
        pipe.set(self._k("job", record.id), encode_record(record))
        pipe.zadd(self._k("jobs"), {record.id: record.created_at})
        pipe.zadd(self._k("state", record.state), {record.id: record.created_at})
        pipe.zadd(self._tenant_key(record.tenant), {record.id: record.created_at})
        pipe.zadd(self._tenant_key(record.tenant, record.state), {record.id: record.created_at})
        if record.upload_sha256:
            pipe.zadd(
                self._k("content", record.tenant, record.upload_sha256, record.params_hash),
                {record.id: record.created_at},
            )

    def _undo_create(self, record: JobRecord, idem: str | None) -> None:
        """Best effort after a failed EXEC: Redis applies the commands of a transaction that did
        not fail at queue time even when one of them errs, so remove whatever did land."""
        try:
            undo = self.client.pipeline(transaction=False)
            undo.delete(self._k("job", record.id))
            for key in (self._k("jobs"), self._k("state", record.state), self._tenant_key(record.tenant),
                        self._tenant_key(record.tenant, record.state)):
                undo.zrem(key, record.id)
            if record.upload_sha256:
                content = self._k("content", record.tenant, record.upload_sha256, record.params_hash)
                undo.zrem(content, record.id)
            undo.execute(raise_on_error=False)
            for claim in (idem, self._claim_key(record)):
                if claim is not None and self.client.get(claim) == record.id.encode():
                    self.client.delete(claim)
        except self._redis_errors:
            pass  # the store is gone: a leftover key names no record, so it blocks no retry

    def _get_many(self, ids: list[bytes] | list[str]) -> list[JobRecord]:
        if not ids:
            return []
        keys = [self._k("job", i.decode() if isinstance(i, bytes) else i) for i in ids]
        with self._errors():
            found = self.client.mget(keys)
        return [JobRecord.from_dict(json.loads(raw)) for raw in found if raw]

    def get(self, job_id: str) -> JobRecord | None:
        with self._errors():
            raw = self.client.get(self._k("job", job_id))
        return JobRecord.from_dict(json.loads(raw)) if raw else None

    def page(
        self, *, limit: int, offset: int = 0, state: str | None = None, tenant: str | None = None
    ) -> tuple[list[JobRecord], int]:
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
        self._delete_if_names(self._idem_key(rec.tenant, rec.idempotency_key), job_id)

    def _delete_if_names(self, key: str, job_id: str) -> None:
        """Delete a claim only if it still names this job (a newer job may own it already)."""
        with self._errors(), self.client.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(key)
                if pipe.get(key) == job_id.encode():
                    pipe.multi()
                    pipe.delete(key)
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
        claim = self._claim_key(rec)
        if claim is not None:
            self._delete_if_names(claim, job_id)
        if rec.idempotency_key and not rec.idempotency_released:
            self._delete_if_names(self._idem_key(rec.tenant, rec.idempotency_key), job_id)

    def finished_before(self, ts: float, limit: int = 500) -> list[JobRecord]:
        found: list[JobRecord] = []
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
        self, job_id: str, allowed: Iterable[str], to_state: str | None, changes: dict[str, Any],
        where: Where | None = None,
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
                    pipe.set(key, encode_record(new))
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

    def due_callbacks(self, now: float, limit: int = 20) -> list[str]:
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

    def ids_in_state(self, state: str) -> list[str]:
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

    def ping(self) -> None:
        with self._errors():
            self.client.ping()

    def close(self) -> None:
        self.client.close()
