"""The Celery task wrapper in process: configuration for long jobs, the task run through
Celery's own machinery (``apply``), and the failure hook for hard time limits."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fprotoseg.worker.errors import TransientJobError
from fprotoseg.worker.service.celery_app import TASK_NAME
from fprotoseg.worker.service.jobstore import JobRecord, RedisJobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.states import FAILED, RUNNING, SUCCEEDED
from fprotoseg.worker.service.tasks import create_worker_app
from tests.app.live import redis_url_for_tests


@pytest.fixture()
def celery_env(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[Settings, object, RedisJobStore]]:
    with redis_url_for_tests(tmp_path) as (url, prefix):
        settings = Settings(
            data_dir=tmp_path / "data",
            broker_url=url,
            redis_key_prefix=prefix,
            checkpoint=tiny_checkpoint,
            device="cpu",
            job_soft_time_limit_s=100,
            job_hard_time_limit_s=120,
            visibility_timeout_s=130,
        )
        settings.uploads_dir.mkdir(parents=True)
        yield settings, create_worker_app(settings), RedisJobStore(url, prefix)


def test_worker_configuration_for_long_gpu_jobs(celery_env) -> None:  # type: ignore[no-untyped-def]
    settings, app, _ = celery_env
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_soft_time_limit == 100 and conf.task_time_limit == 120
    assert conf.broker_transport_options["visibility_timeout"] == 130 > conf.task_time_limit
    assert conf.broker_transport_options["global_keyprefix"] == settings.redis_key_prefix
    assert conf.worker_max_tasks_per_child == settings.worker_max_tasks_per_child
    task = app.tasks[TASK_NAME]
    assert task.acks_late and task.reject_on_worker_lost
    assert task.autoretry_for == (TransientJobError,)  # only transient errors are retried


def test_the_task_runs_a_job_through_celery(celery_env, shared_data: Path) -> None:  # type: ignore[no-untyped-def]
    settings, app, store = celery_env
    job_id = str(uuid.uuid4())
    upload = settings.uploads_dir / f"{job_id}.svs"
    shutil.copyfile(shared_data / "slides/CMU-1-Small-Region.svs", upload)
    store.create(JobRecord(id=job_id, upload_path=str(upload)))
    result = app.tasks[TASK_NAME].apply(args=[job_id])
    assert result.get() == SUCCEEDED
    assert store.get(job_id).state == SUCCEEDED


def test_hard_time_limit_and_exhausted_retries_fail_the_job(celery_env) -> None:  # type: ignore[no-untyped-def]
    from billiard.exceptions import TimeLimitExceeded

    _, app, store = celery_env
    task = app.tasks[TASK_NAME]
    killed = store.create(JobRecord(id=str(uuid.uuid4()), state=RUNNING))
    task.on_failure(TimeLimitExceeded(120), killed.id, [killed.id], {}, None)
    rec = store.get(killed.id)
    assert rec.state == FAILED and rec.error_code == "time_limit" and "HARD_TIME_LIMIT" in rec.error_message
    flaky = store.create(JobRecord(id=str(uuid.uuid4()), state=RUNNING))
    task.on_failure(TransientJobError("job store unavailable"), flaky.id, [flaky.id], {}, None)
    assert store.get(flaky.id).error_code == "transient_error"
    done = store.create(JobRecord(id=str(uuid.uuid4()), state=SUCCEEDED))
    task.on_failure(TimeLimitExceeded(120), done.id, [done.id], {}, None)
    assert store.get(done.id).state == SUCCEEDED  # a finished job is never changed
