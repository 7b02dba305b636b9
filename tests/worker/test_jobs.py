"""process_job on real slides with a real (tiny, random-weight) network: success, idempotent
redelivery, cancel mid-run, bad slides, worker-loss guard, shutdown requeue, signed callbacks."""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from pathlib import Path

import pytest

from fprotoseg.worker.service.callbacks import deliver_due, verify
from fprotoseg.worker.service.jobs import process_job
from fprotoseg.worker.service.jobstore import JobRecord, SqliteJobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED
from fprotoseg.worker.wsi.result_files import COMPLETE_MARKER, RESULT_FILES, results_complete
from tests.app.live import CallbackRecorder, write_mosaic_slide

SLIDE = "slides/CMU-1-Small-Region.svs"


@pytest.fixture()
def env(tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")
    settings = Settings(
        data_dir=tmp_path / "data",
        checkpoint=tiny_checkpoint,
        device="cpu",
        callback_secret="sekret",
        callback_backoff_s=0.05,
        callback_allowed_hosts=["127.0.0.1"],
        cancel_poll_interval_s=0.0,
        progress_interval_s=0.0,
    )
    settings.uploads_dir.mkdir(parents=True)
    return settings, SqliteJobStore(settings.sqlite_path)


def queue_slide(settings: Settings, store: SqliteJobStore, source: Path, **kw) -> JobRecord:  # type: ignore[no-untyped-def]
    job_id = str(uuid.uuid4())
    upload = settings.uploads_dir / f"{job_id}{source.suffix}"
    shutil.copyfile(source, upload)
    return store.create(JobRecord(id=job_id, upload_path=str(upload), **kw))


def test_job_succeeds_and_a_redelivery_does_not_redo_it(env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    hook = CallbackRecorder()
    try:
        rec = queue_slide(settings, store, shared_data / SLIDE, callback_url=hook.url)
        done = process_job(rec.id, settings, store)
        assert done.state == SUCCEEDED and done.progress == 1.0 and done.attempts == 1
        assert done.tiles and done.tiles > 0 and done.duration_s > 0
        result_dir = settings.result_dir(rec.id)
        assert results_complete(result_dir)
        assert (result_dir / "segmentation.geojson.gz").is_file()
        mtimes = {p.name: p.stat().st_mtime_ns for p in result_dir.iterdir()}

        again = process_job(rec.id, settings, store)  # Redis redelivered the message
        assert again == done
        assert {p.name: p.stat().st_mtime_ns for p in result_dir.iterdir()} == mtimes
        assert done.callback_status == "pending"  # the outbox delivers, not the job
        assert deliver_due(settings, store) == 1 and deliver_due(settings, store) == 0
        assert store.get(rec.id).callback_status == "delivered"
    finally:
        hook.close()
    assert len(hook.received) == 1  # one callback for one completion
    headers, body = hook.received[0]
    assert verify("sekret", headers["X-Fprotoseg-Timestamp"], body, headers["X-Fprotoseg-Signature"])
    assert not verify("other", headers["X-Fprotoseg-Timestamp"], body, headers["X-Fprotoseg-Signature"])
    payload = json.loads(body)
    assert payload["state"] == "succeeded" and payload["links"]["geojson"].endswith(f"/jobs/{rec.id}/geojson")
    metrics = store.metrics()
    assert metrics["duration_count"] == 1 and metrics["tiles_total"] == done.tiles


def test_results_published_before_a_crash_are_not_recomputed(env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    """The worker died after publishing but before recording success: the redelivery only records it."""
    settings, store = env
    first = queue_slide(settings, store, shared_data / SLIDE)
    process_job(first.id, settings, store)
    second = queue_slide(settings, store, shared_data / SLIDE)
    store.transition(second.id, RUNNING, [QUEUED], attempts=1)
    shutil.copytree(settings.result_dir(first.id), settings.result_dir(second.id))
    before = {p.name: p.stat().st_mtime_ns for p in settings.result_dir(second.id).iterdir()}
    rec = process_job(second.id, settings, store)
    assert rec.state == SUCCEEDED and rec.attempts == 1 and rec.tiles is None  # no new run
    assert {p.name: p.stat().st_mtime_ns for p in settings.result_dir(second.id).iterdir()} == before


def test_cancel_stops_a_running_job_at_the_next_batch(env, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    settings = settings.model_copy(update={"batch_size": 2})
    mosaic = tmp_path / "mosaic.tif"
    write_mosaic_slide(shared_data / SLIDE, mosaic, (2, 2))
    rec = queue_slide(settings, store, mosaic)
    outcome: list[JobRecord] = []
    worker = threading.Thread(target=lambda: outcome.append(process_job(rec.id, settings, store)))
    worker.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        current = store.get(rec.id)
        if current.state == RUNNING and current.stage == "inference" and current.progress > 0.06:
            break
        time.sleep(0.05)
    progress_at_cancel = store.get(rec.id).progress
    assert store.request_cancel(rec.id).cancel_requested
    worker.join(60)
    assert not worker.is_alive()
    assert outcome[0].state == CANCELLED and outcome[0].finished_at is not None
    assert progress_at_cancel < 0.9
    assert not settings.result_dir(rec.id).exists()
    assert list((settings.jobs_dir / rec.id).iterdir()) == []  # the partial work is removed


def test_a_job_over_the_soft_time_limit_fails_in_every_mode(env, shared_data: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    settings = settings.model_copy(update={"batch_size": 2, "job_soft_time_limit_s": 0.5})
    mosaic = tmp_path / "mosaic.tif"
    write_mosaic_slide(shared_data / SLIDE, mosaic, (2, 2))
    rec = process_job(queue_slide(settings, store, mosaic).id, settings, store)
    assert rec.state == FAILED and rec.error_code == "time_limit"
    assert "FPROTOSEG_JOB_SOFT_TIME_LIMIT_S=0.5" in rec.error_message
    assert not settings.result_dir(rec.id).exists()


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"II*\x00" + b"\x08\x00\x00\x00" + b"\x00" * 64, "unreadable_slide"),
        (b"this is text, not a slide\n" * 50, "unsupported_format"),
    ],
)
def test_a_bad_slide_fails_the_job_with_a_reason(env, tmp_path: Path, content: bytes, code: str) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    bad = tmp_path / "bad.svs"
    bad.write_bytes(content)
    rec = process_job(queue_slide(settings, store, bad).id, settings, store)
    assert rec.state == FAILED
    assert rec.error_code and rec.error_message and "Traceback" not in rec.error_message
    assert rec.error_code in (code, "unreadable_slide", "unsupported_format", "slide_too_large")


def test_missing_mpp_fails_unless_given(env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    no_mpp = shared_data / "slides/TCGA-CR-7395-01A-01-TS1.svs"
    failed = process_job(queue_slide(settings, store, no_mpp, filename="病理 #1.svs").id, settings, store)
    assert failed.state == FAILED and failed.error_code == "missing_mpp"
    # it speaks to the HTTP client (form field, its own file name), never of server files
    assert "form field mpp" in failed.error_message and "--mpp" not in failed.error_message
    assert "'病理 #1.svs'" in failed.error_message and failed.id not in failed.error_message
    assert str(settings.data_dir) not in failed.error_message
    ok = process_job(queue_slide(settings, store, no_mpp, mpp=0.5).id, settings, store)
    assert ok.state == SUCCEEDED, ok


def test_a_job_whose_worker_keeps_dying_fails_instead_of_looping(env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    rec = queue_slide(settings, store, shared_data / SLIDE)
    store.transition(rec.id, RUNNING, [QUEUED], attempts=settings.max_delivery_attempts)
    out = process_job(rec.id, settings, store)
    assert out.state == FAILED and out.error_code == "worker_lost"


def test_shutdown_requeues_the_running_job(env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    rec = queue_slide(settings, store, shared_data / SLIDE)
    out = process_job(rec.id, settings, store, should_stop=lambda: True)
    assert out.state == QUEUED and out.attempts == 0
    assert process_job(rec.id, settings, store).state == SUCCEEDED


def test_a_failing_callback_never_fails_the_job(env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    hook = CallbackRecorder(status=500)
    try:
        rec = queue_slide(settings, store, shared_data / SLIDE, callback_url=hook.url)
        assert process_job(rec.id, settings, store).state == SUCCEEDED
        deadline = time.monotonic() + 30
        while store.get(rec.id).callback_status == "pending" and time.monotonic() < deadline:
            deliver_due(settings, store)
            time.sleep(0.05)
    finally:
        hook.close()
    assert len(hook.received) == settings.callback_attempts  # retried, then given up
    assert store.get(rec.id).callback_status == "failed" and store.get(rec.id).state == SUCCEEDED
    dead = queue_slide(
        settings, store, shared_data / SLIDE, callback_url="http://127.0.0.1:9/nothing-listens"
    )
    assert process_job(dead.id, settings, store).state == SUCCEEDED
    assert (settings.result_dir(rec.id) / COMPLETE_MARKER).is_file()
    assert set(RESULT_FILES.values()) <= {p.name for p in settings.result_dir(rec.id).iterdir()}


def test_uploads_can_be_discarded_once_final(env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    settings, store = env
    settings = settings.model_copy(update={"keep_uploads": False})
    rec = queue_slide(settings, store, shared_data / SLIDE)
    assert Path(rec.upload_path).is_file()
    assert process_job(rec.id, settings, store).state == SUCCEEDED
    assert not Path(rec.upload_path).exists() and results_complete(settings.result_dir(rec.id))
    assert process_job(rec.id, settings, store).state == SUCCEEDED  # a redelivery needs no upload
