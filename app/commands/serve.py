"""``fprotoseg serve``: the HTTP API, plus a local worker process when no broker is configured.

Embedded default (FPROTOSEG_BROKER_URL unset): jobs live in SQLite in the data dir and a local
worker process (``python -m fprotoseg.worker.service.embedded``) runs them; it is restarted if it dies. With a
broker the API only enqueues and ``fprotoseg worker`` processes. With no API key configured and
auth not disabled, a key is generated once into ``<data dir>/api-key`` (mode 0600) and printed.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

log = logging.getLogger("fprotoseg.serve")


class LocalWorker:
    """Runs and supervises the embedded worker process (restarts it with a growing back-off)."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="local-worker", daemon=True)

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["FPROTOSEG_DATA_DIR"] = str(self.settings.data_dir.resolve())
        if self.settings.checkpoint:
            env["FPROTOSEG_CHECKPOINT"] = str(self.settings.checkpoint)
        # glibc would return torch's large buffers to the OS after each batch (halves CPU speed).
        env.setdefault("MALLOC_MMAP_MAX_", "0")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "68719476736")
        return subprocess.Popen([sys.executable, "-m", "fprotoseg.worker.service.embedded"], env=env)

    def start(self) -> None:
        self.proc = self._spawn()
        self._thread.start()

    def _supervise(self) -> None:
        delay_s = 1.0
        while not self._stopping.wait(1.0):
            proc = self.proc
            if proc is None or proc.poll() is None:
                continue
            log.error("the local worker exited (code %s); restarting it in %.0f s", proc.returncode, delay_s)
            if self._stopping.wait(delay_s):
                return
            delay_s = min(delay_s * 2, 60.0)
            self.proc = self._spawn()

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # the worker requeues its current job at the next batch and exits
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fprotoseg.app.auth import load_or_create_api_key
    from fprotoseg.app.main import create_app
    from fprotoseg.worker.service.callbacks import signing_secret
    from fprotoseg.worker.service.settings import load_settings
    from fprotoseg.worker.service.storage import prepare_data_dir, private_umask

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides: dict[str, Any] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = load_settings(**overrides)
    private_umask()  # uploads, results, the job store and the secrets: 0600 files, 0700 dirs
    prepare_data_dir(settings.data_dir)  # a read-only data dir ends here, in one line
    print(f"fprotoseg: data dir {settings.data_dir.resolve()} (private, mode 0700)", file=sys.stderr)
    if not settings.auth_disabled and not settings.api_keys:
        key, created = load_or_create_api_key(settings)
        settings = settings.model_copy(update={"api_keys": [key]})
        what = "generated" if created else "read"
        print(f"fprotoseg: API key ({what} {settings.api_key_file}, mode 0600): {key}", file=sys.stderr)
        print(
            "fprotoseg: send it as the X-API-Key header; set FPROTOSEG_API_KEYS to choose your own",
            file=sys.stderr,
        )
    elif settings.auth_disabled:
        print(
            "fprotoseg: WARNING: FPROTOSEG_AUTH_DISABLED=true, anyone who can connect can use the API",
            file=sys.stderr,
        )

    if not settings.callback_secret:
        signing_secret(settings)  # generated now, once, so every worker signs with the same one
        print(
            f"fprotoseg: callbacks are signed with the secret in {settings.callback_secret_file} "
            "(or set FPROTOSEG_CALLBACK_SECRET)",
            file=sys.stderr,
        )
    app = create_app(settings)
    worker = None
    if settings.embedded and not args.no_worker:
        worker = LocalWorker(settings)
        worker.start()
    mode = (
        "embedded worker" if worker else ("API only, no worker" if settings.embedded else "API only, Celery")
    )
    where = f"http://{settings.host}:{settings.port}"
    print(f"fprotoseg: serving {where} ({mode}; data in {settings.data_dir.resolve()})", file=sys.stderr)
    # uvicorn re-raises SIGTERM after its graceful shutdown; with the default handler that would
    # end this process before the local worker is stopped (leaving it orphaned). Exit cleanly instead.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level=args.log_level,
            timeout_graceful_shutdown=10,
            access_log=args.access_log,
        )
    finally:
        if worker is not None:
            worker.stop()
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve",
        help="run the HTTP API (+ a local worker when FPROTOSEG_BROKER_URL is unset)",
        description="Run the HTTP API. Without FPROTOSEG_BROKER_URL a local worker process runs the "
        "jobs (the embedded default); with it, the API only enqueues for `fprotoseg worker`.",
    )
    p.add_argument("--host", default=None, help="bind address (default FPROTOSEG_HOST or 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="port (default FPROTOSEG_PORT or 8000)")
    p.add_argument("--no-worker", action="store_true", help="embedded mode without the local worker process")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(handler=_serve)
