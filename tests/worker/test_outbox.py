"""Issue 22, item 1 (the outbox's part): a callback whose payload cannot be encoded (a record from a
version that stored a lone surrogate) is marked failed once, not retried and logged every 40 s."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from fprotoseg.worker.service.callbacks import deliver_due, enqueue
from fprotoseg.worker.service.jobstore import JobRecord, SqliteJobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import QUEUED, SUCCEEDED
from tests.app.live import CallbackRecorder


@pytest.mark.parametrize(
    "metadata", [{"s": "\ud800x"}, {"n": float("nan")}, {"n": float("inf")}], ids=["surrogate", "nan", "inf"]
)
def test_an_unencodable_callback_is_marked_failed_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, metadata: dict[str, object]
) -> None:
    settings = Settings(data_dir=tmp_path, callback_allowed_hosts=["127.0.0.1"], callback_backoff_s=0.0)
    store = SqliteJobStore(settings.sqlite_path)
    hook = CallbackRecorder()
    try:
        bad = store.create(
            JobRecord(id="job-unencodable", callback_url=hook.url, metadata=metadata, filename="a.svs")
        )
        good = store.create(JobRecord(id="job-fine", callback_url=hook.url, metadata={"s": "ok"}))
        for rec in (bad, good):
            enqueue(store, store.transition(rec.id, SUCCEEDED, [QUEUED], finished_at=time.time()))
        assert str(store.get(bad.id).metadata) == str(metadata)  # stored and read back as it was

        with caplog.at_level(logging.INFO, logger="fprotoseg.worker.service.callbacks"):
            deliver_due(settings, store)
            # Long after any lease or back-off: nothing is left to try, nothing is logged again.
            for later_s in (60.0, 3600.0, 86400.0):
                assert deliver_due(settings, store, now=time.time() + later_s) == 0

        failed = store.get(bad.id)
        assert failed.callback_status == "failed" and failed.callback_attempts == 1
        assert store.get(good.id).callback_status == "delivered"
        assert store.due_callbacks(time.time() + 10**6) == []
        assert len(hook.received) == 1  # only the good job reached the LIMS
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING and bad.id in r.getMessage()]
        assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    finally:
        hook.close()
