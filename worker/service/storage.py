"""The data dir at rest: private modes, writability, free space, generated secrets.

The data dir holds patient slides, results and secrets, so everything the service creates there is
private to its user (directories 0700, files 0600): :func:`private_umask` is set once by each
service process (``fprotoseg serve``, ``fprotoseg worker``, the embedded worker) and
:func:`prepare_data_dir` fixes the modes of what an older version left. Stdlib only: the API and
the workers both import it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import sqlite3
import uuid
from pathlib import Path

from fprotoseg.model.errors import ConfigurationError

__all__ = [
    "DIR_MODE",
    "FILE_MODE",
    "free_mb",
    "is_out_of_space",
    "load_or_create_secret",
    "prepare_data_dir",
    "private_umask",
]

DIR_MODE = 0o700
FILE_MODE = 0o600
_OUT_OF_SPACE = {errno.ENOSPC, errno.EDQUOT}


def private_umask() -> None:
    """New files 0600 and directories 0700 in this process (and the processes it starts)."""
    os.umask(0o077)


def is_out_of_space(exc: BaseException) -> bool:
    """True for "no space left on device" or "quota exceeded", also when SQLite reports it."""
    if isinstance(exc, OSError) and exc.errno in _OUT_OF_SPACE:
        return True
    text = str(exc).lower()
    return "database or disk is full" in text or "no space left" in text


def give_back_sqlite_journal(db: sqlite3.Connection) -> None:
    """After SQLite reported a full disk: end the failed transaction, fold the write-ahead log into
    the database and truncate it to 0 bytes. Its space is what lets the next write through (the
    job's ``disk_full``, the reaper's requeue); without this a full disk kept every write failing,
    and a job stayed ``running`` for good. Best effort: a checkpoint that finds no room either
    leaves things as they were."""
    with contextlib.suppress(sqlite3.Error):
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def free_mb(path: Path) -> float:
    """Free space for an unprivileged writer on the file system of ``path``, in MiB."""
    return shutil.disk_usage(path).free / 2**20


def prepare_data_dir(data_dir: Path, subdirs: tuple[Path, ...] = ()) -> None:
    """Create the data dir (and ``subdirs``) private, and prove it is writable.

    Raises ConfigurationError with one line naming FPROTOSEG_DATA_DIR when it cannot be created or
    written: a service that starts on a read-only dir would only fail later, upload by upload.
    """
    try:
        for path in (data_dir, *subdirs):
            path.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            if path.stat().st_uid == os.getuid():
                path.chmod(DIR_MODE)
        probe = data_dir / f".write-probe-{uuid.uuid4().hex}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigurationError(
            f"FPROTOSEG_DATA_DIR {data_dir} is not writable ({reason}); fix its permissions or choose another"
        ) from None


def load_or_create_secret(path: Path, n_bytes: int = 32) -> tuple[str, bool]:
    """(secret, created): the secret stored at ``path`` (0600), generated there on first use.

    ``O_EXCL`` makes concurrent first starts (API and a worker on one volume) agree on one value.
    """
    for _ in range(3):
        try:
            value = path.read_text().strip()
            if value:
                return value, False
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        value = secrets.token_urlsafe(n_bytes)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        except FileExistsError:
            continue  # another process won the race: read its value
        with os.fdopen(fd, "w") as fh:
            fh.write(value + "\n")
        os.chmod(path, FILE_MODE)
        return value, True
    raise ConfigurationError(f"cannot read or create the secret {path.name} in FPROTOSEG_DATA_DIR")
