"""Errors as RFC 9457 ``application/problem+json``; never a stack trace in a body.

Every error the API returns carries ``type``, ``title``, ``status``, ``detail`` and a stable
``code`` (the same codes as job errors), so a LIMS can branch on ``code`` and show ``detail``.
Mapping is by class: every :class:`~fprotoseg.model.errors.FprotosegError` (a
:class:`~fprotoseg.app.errors.Problem` included) answers with its own ``http_status``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fprotoseg.app.errors import Problem
from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.storage import is_out_of_space

__all__ = [
    "PROBLEM_MEDIA_TYPE",
    "Problem",
    "install_problem_handlers",
    "problem_response",
    "validation_detail",
]

log = logging.getLogger("fprotoseg.api")

# What a client reads of an infrastructure failure: what failed and what to do, never where
# (the driver's own message, with host, port or path, goes to the server log).
_UNAVAILABLE_DETAIL = {
    ErrorCode.JOBSTORE_UNAVAILABLE: "the job store is unreachable; try again after Retry-After",
    ErrorCode.BROKER_UNAVAILABLE: "the job queue is unreachable; try again after Retry-After",
    ErrorCode.STORAGE_UNAVAILABLE: "the server's storage cannot be used right now; try again after "
    "Retry-After",
}

PROBLEM_MEDIA_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Upload too large",
    415: "Unsupported media type",
    422: "Unprocessable content",
    500: "Internal server error",
    503: "Service unavailable",
    507: "Insufficient storage",
}


def problem_response(
    code: str,
    detail: str,
    *,
    status: int | None = None,
    instance: str | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> JSONResponse:
    """The one way a problem body is built. ``status`` defaults to the code's in the registry
    (a code of the model layer, a plain string, comes with the status of its error class)."""
    if status is None:
        status = code.http_status if isinstance(code, ErrorCode) else 500
    body: dict[str, Any] = {
        "type": f"urn:fprotoseg:problem:{code}",
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "code": code,
    }
    if instance:
        body["instance"] = instance
    body.update(extra or {})
    return JSONResponse(body, status_code=status, media_type=PROBLEM_MEDIA_TYPE, headers=headers)


def validation_detail(errors: Sequence[Any]) -> str:
    """One line naming each bad field (at most five) of a pydantic/FastAPI validation error:
    ``mpp: Input should be a valid number``."""
    parts = []
    for err in errors[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "; ".join(parts) or "invalid request"


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the API serves at ``path``, from its OpenAPI paths (Starlette's 405 names only
    the methods of the one route that matched, so ``OPTIONS /jobs/x`` would omit DELETE)."""
    import re

    methods: set[str] = set()
    for template, item in app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {m.upper() for m in item}
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


def _out_of_space(request: Request, exc: BaseException) -> JSONResponse:
    log.error("out of disk space on %s %s: %s", request.method, request.url.path, exc)
    return problem_response(
        ErrorCode.INSUFFICIENT_STORAGE,
        "the server is out of disk space; try again later",
        instance=request.url.path,
        headers={"Retry-After": "300"},
    )


def install_problem_handlers(app: FastAPI) -> None:
    """Route every error path (ours, FastAPI's, Starlette's, unexpected) to a problem body."""

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(
            exc.status_code, ErrorCode.HTTP_ERROR
        )
        detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(exc.status_code, "error")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(allowed_methods(app, request.url.path))
        return problem_response(
            code,
            detail,
            status=exc.status_code,
            instance=request.url.path,
            headers=headers or None,
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = validation_detail(exc.errors())
        return problem_response(ErrorCode.INVALID_REQUEST, detail, instance=request.url.path)

    @app.exception_handler(FprotosegError)
    async def _fprotoseg(request: Request, exc: FprotosegError) -> JSONResponse:
        """Any error of any layer, by its class: its ``http_status``, ``code`` and one-line message."""
        problem = exc if isinstance(exc, Problem) else None
        headers = dict(problem.headers) if problem else {}
        detail = exc.message
        if exc.http_status == 503:
            headers.setdefault("Retry-After", "5")  # transient by definition: say when to come back
            if problem is None:  # a driver's message names hosts, ports and paths: the log only
                log.error("%s %s: %s", request.method, request.url.path, exc.message)
                detail = next(
                    (text for code, text in _UNAVAILABLE_DETAIL.items() if code == exc.code),
                    _UNAVAILABLE_DETAIL[ErrorCode.STORAGE_UNAVAILABLE],
                )
        return problem_response(
            exc.code,
            detail,
            status=exc.http_status,
            instance=request.url.path,
            headers=headers or None,
            extra=problem.extra if problem else None,
        )

    @app.exception_handler(OSError)
    async def _storage(request: Request, exc: OSError) -> JSONResponse:
        """The data dir vanished, turned read-only, lost its mount, or is full. A handler of its
        own: Starlette answers an ``Exception`` handler's response and then re-raises (a traceback
        in the log, and a client still sending its upload sees the connection reset)."""
        if is_out_of_space(exc):
            return _out_of_space(request, exc)
        log.error("storage error on %s %s: %s", request.method, request.url.path, exc)
        return problem_response(
            ErrorCode.STORAGE_UNAVAILABLE,
            _UNAVAILABLE_DETAIL[ErrorCode.STORAGE_UNAVAILABLE],
            instance=request.url.path,
            headers={"Retry-After": "30"},
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_out_of_space(exc):
            return _out_of_space(request, exc)
        # The traceback goes to the server log only; the body names the error class and nothing more.
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return problem_response(
            ErrorCode.INTERNAL_ERROR,
            f"internal error ({type(exc).__name__}); see the server log",
            instance=request.url.path,
        )
