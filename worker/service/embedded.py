"""The embedded executor: the local worker process of ``fprotoseg serve`` when no broker is set.

It runs the same :func:`fprotoseg.worker.service.jobs.process_job` as the Celery task, taking
queued jobs from the SQLite job store first in, first out. It is a separate process so that
inference never blocks the API and a crash (out of memory) does not take the API down;
``fprotoseg serve`` restarts it.
Jobs left ``running`` by a previous process are requeued at start (there is one local worker),
and SIGTERM/SIGINT requeue the current job at its next batch.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

from fprotoseg.worker.errors import JobStoreError, TransientJobError
from fprotoseg.worker.service.callbacks import CallbackOutbox
from fprotoseg.worker.service.jobs import process_job
from fprotoseg.worker.service.jobstore import SqliteJobStore, open_jobstore
from fprotoseg.worker.service.segmenters import get_segmenter
from fprotoseg.worker.service.settings import Settings, load_settings
from fprotoseg.worker.service.states import QUEUED, RUNNING
from fprotoseg.worker.service.storage import private_umask

log = logging.getLogger("fprotoseg.embedded")

HEARTBEAT_INTERVAL_S = 2.0


def worker_name() -> str:
    return f"embedded@{os.uname().nodename}:{os.getpid()}"


def _heartbeat_loop(settings: Settings, stop: threading.Event) -> None:
    store = SqliteJobStore(settings.sqlite_path)
    name = worker_name()
    while not stop.is_set():
        try:
            store.heartbeat(name)
        except JobStoreError as exc:
            log.warning("heartbeat failed: %s", exc)
        stop.wait(HEARTBEAT_INTERVAL_S)


def run_embedded_worker(settings: Settings, stop: threading.Event | None = None) -> int:
    """Process queued jobs until ``stop`` is set (or SIGTERM/SIGINT in the main thread)."""
    stop = stop or threading.Event()
    parent_pid = os.getppid()

    def should_stop() -> bool:
        """Stop when asked, or when ``fprotoseg serve`` died without asking (never run orphaned)."""
        if os.getppid() != parent_pid:
            stop.set()
        return stop.is_set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    store = SqliteJobStore(settings.sqlite_path)  # the embedded worker's queue (no broker)
    for job_id in store.ids_in_state(RUNNING):
        store.transition(job_id, QUEUED, [RUNNING], stage="requeued after a worker restart", progress=0.0)
        log.info("job %s: requeued (its worker stopped)", job_id)
    threading.Thread(target=_heartbeat_loop, args=(settings, stop), daemon=True, name="heartbeat").start()
    # Callbacks go out beside the jobs, on their own store connection: a dead receiver never
    # delays the next job.
    outbox = CallbackOutbox(settings, open_jobstore(settings)).start()
    try:
        get_segmenter(settings)  # load once, before the first job
    except Exception as exc:  # jobs will fail with this reason; keep serving the queue
        log.error("model could not be loaded: %s", exc)
    log.info("embedded worker ready (pid %d)", os.getpid())
    while not should_stop():
        try:
            rec = store.oldest_queued()
        except JobStoreError as exc:
            log.warning("job store unavailable: %s", exc)
            stop.wait(2.0)
            continue
        if rec is None:
            stop.wait(settings.embedded_poll_interval_s)
            continue
        try:
            process_job(rec.id, settings, store, should_stop=should_stop)
        except TransientJobError as exc:
            log.warning("%s; retrying", exc.message)
            stop.wait(2.0)
    outbox.stop()
    log.info("embedded worker stopped")
    return 0


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    private_umask()  # results and work files of patient slides: 0600 / 0700
    if settings.embedded_worker_nice:
        # Inference saturates every core; a lower priority keeps the API answering meanwhile.
        os.nice(settings.embedded_worker_nice)
    return run_embedded_worker(settings)


if __name__ == "__main__":
    sys.exit(main())
