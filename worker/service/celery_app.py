"""The Celery application: configuration only, no tasks, so the API can send jobs by name.

The API builds this app to call ``send_task(TASK_NAME, ...)``; it never imports
``fprotoseg.worker.service.tasks`` (and so never torch or OpenSlide). Workers add the task with
:func:`fprotoseg.worker.service.tasks.create_worker_app`. The settings follow Celery's guide for long tasks:
acknowledge late, prefetch one, requeue when a worker dies, a visibility timeout above the
longest job.
"""

from __future__ import annotations

from typing import Any

from fprotoseg.model.errors import ConfigurationError
from fprotoseg.worker.service.settings import Settings

TASK_NAME = "fprotoseg.process_job"


def broker_transport_options(settings: Settings) -> dict[str, Any]:
    return {
        # A job not acknowledged within this many seconds is delivered again (its worker is
        # presumed dead); it must exceed the hard time limit or long jobs would run twice.
        "visibility_timeout": settings.visibility_timeout_s,
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        # Every Kombu key under the same prefix as the job store: one namespace to inspect or clear.
        "global_keyprefix": settings.redis_key_prefix,
        "socket_timeout": 30,
        "socket_connect_timeout": 5,
    }


def make_celery(settings: Settings) -> Any:
    """A Celery app configured from ``settings`` (requires FPROTOSEG_BROKER_URL)."""
    from celery import Celery

    if not settings.broker_url:
        raise ConfigurationError(
            "FPROTOSEG_BROKER_URL is not set; `fprotoseg serve` runs an embedded worker instead"
        )
    app = Celery("fprotoseg", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue,
        task_routes={TASK_NAME: {"queue": settings.queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,  # the job store holds states and results
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        task_soft_time_limit=settings.job_soft_time_limit_s,
        task_time_limit=settings.job_hard_time_limit_s,
        broker_transport_options=broker_transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_hijack_root_logger=False,
        enable_utc=True,
    )
    return app


def queue_length(app: Any, settings: Settings) -> int:
    """Messages waiting in the broker queue (not yet taken by a worker)."""
    with app.connection_for_write() as conn:
        client = conn.default_channel.client  # Kombu's prefixed Redis client
        return int(client.llen(settings.queue))
