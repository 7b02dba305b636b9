"""The one exception hierarchy of fprotoseg.

Every error a user can cause carries a stable machine-readable ``code`` (used in job records and
HTTP problem bodies) and a one-line human message. Lives in ``model`` because it is the bottom of
the dependency chain (app -> worker -> model); it imports nothing heavy.
"""

from __future__ import annotations


class FprotosegError(Exception):
    """Base class: an expected failure with a code and a one-line message (never a traceback)."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class CheckpointError(FprotosegError):
    """A checkpoint file is missing, corrupt, foreign, or not a fprotoseg checkpoint."""

    code = "invalid_checkpoint"


class DeviceError(FprotosegError):
    """The requested device/precision combination is not available here."""

    code = "device_unavailable"
