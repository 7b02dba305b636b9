"""``fprotoseg worker``: a Celery worker on FPROTOSEG_BROKER_URL (concurrency 1 by default: one GPU).

Prefork pool, so the soft/hard time limits and max-tasks-per-child apply; the model is loaded
once per worker process. Run one per GPU (``CUDA_VISIBLE_DEVICES=n fprotoseg worker``).
"""

from __future__ import annotations

import argparse


def _worker(args: argparse.Namespace) -> int:
    from fprotoseg.model.errors import ConfigurationError
    from fprotoseg.worker.service.settings import load_settings

    overrides = {"worker_concurrency": args.concurrency} if args.concurrency else {}
    settings = load_settings(**overrides)
    if settings.embedded:
        raise ConfigurationError(
            "FPROTOSEG_BROKER_URL is not set; set it to redis://HOST:6379/0, or run `fprotoseg serve` "
            "alone (it includes a worker)"
        )
    from fprotoseg.worker.service.storage import prepare_data_dir, private_umask

    private_umask()  # results and work files of patient slides: 0600 / 0700
    prepare_data_dir(settings.data_dir, (settings.uploads_dir, settings.jobs_dir))
    from fprotoseg.worker.service.tasks import create_worker_app

    app = create_worker_app(settings)
    argv = [
        "worker",
        f"--loglevel={args.loglevel}",
        f"--concurrency={settings.worker_concurrency}",
        f"--queues={settings.queue}",
        f"--pool={args.pool}",
        f"--hostname={args.hostname}",
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("worker", help="run a Celery worker (needs FPROTOSEG_BROKER_URL)")
    p.add_argument("--concurrency", type=int, default=None, help="parallel jobs (default 1: one GPU)")
    p.add_argument("--pool", default="prefork", choices=["prefork", "solo"], help="solo: no time limits")
    p.add_argument(
        "--hostname",
        default="fprotoseg@%h",
        help="Celery node name (several workers on one host: give each its own, e.g. fprotoseg-gpu1@%%h)",
    )
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(handler=_worker)
