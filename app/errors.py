"""The errors of the app layer (HTTP edge and CLI), in the one hierarchy rooted at FprotosegError.

:class:`Problem` is an HTTP answer raised from a route with its own status; :class:`UsageError`
is a bad command-line argument (the CLI's one line and exit code 2, never a SlideError). Errors
of the layers below keep their own classes (``fprotoseg.worker.errors``,
``fprotoseg.model.errors``); :mod:`fprotoseg.app.problems` maps every class to its HTTP status.
No FastAPI here: the CLI imports this module too.
"""

from __future__ import annotations

from typing import Any

from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.errors import CodedError


class Problem(FprotosegError):
    """Raise from a route to answer with a problem body of ``code``.

    The status is the code's (:class:`ErrorCode`); ``status`` only where one code answers with
    another status on one path (``invalid_request`` for a JSON body too large: 413).
    """

    def __init__(
        self,
        code: ErrorCode,
        detail: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail, code=code)
        self.http_status = status or code.http_status
        self.headers = headers or {}
        self.extra = extra or {}

    @property
    def status(self) -> int:
        return self.http_status

    @property
    def detail(self) -> str:
        return self.message


class UsageError(CodedError):
    """A command-line argument is out of range (``--batch-size 0``); the message names it."""

    code = ErrorCode.INVALID_ARGUMENT
