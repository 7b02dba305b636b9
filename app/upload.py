"""Receive a multipart upload straight to disk, hashing while streaming, enforcing the size cap.

FastAPI's ``UploadFile`` would buffer the whole body (to memory, then a temp file) before the
route runs, so neither the cap nor the hash could act while the bytes arrive. Here the request
stream goes through python-multipart's push parser: each chunk of the ``file`` part is written
to a server-named temp file in the uploads directory and fed to sha256; small form fields are
kept in memory up to a few KB. API memory stays flat whatever the slide size.
"""

from __future__ import annotations

import hashlib
import logging
import os
import unicodedata
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from fastapi import Request
from python_multipart.multipart import MultipartParser, parse_options_header

from fprotoseg.app.errors import Problem
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.storage import FILE_MODE, free_mb, is_out_of_space
from fprotoseg.worker.wsi.roi import MAX_ROI_BYTES

log = logging.getLogger("fprotoseg.api")

FILE_FIELD = "file"
MAX_FILENAME_CHARS = 1024
RETRY_AFTER_FULL_S = 300
MAX_FIELD_BYTES = 8192
# fields allowed more than MAX_FIELD_BYTES: a region of interest traced in QuPath has many vertices
FIELD_BYTE_CAPS = {"roi": MAX_ROI_BYTES}
MAX_FIELDS = 16
# After the cap is hit, read (and discard) at most this much more so the client sees the 413
# instead of a reset connection; beyond it the connection is simply closed.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
TEMP_PREFIX = ".incoming-"


@dataclass
class ReceivedUpload:
    """A complete upload on disk (temp name) plus its form fields."""

    path: Path
    sha256: str
    size_bytes: int
    filename: str
    fields: dict[str, str] = field(default_factory=dict)


def client_filename(raw: str | None) -> str:
    """The client's file name exactly as sent (Unicode included), for a LIMS to match its case.

    It is data only, never a path: the stored file is named by the server. Refused (422) when it
    is longer than MAX_FILENAME_CHARS or holds control characters (they would forge log lines
    and break every report a LIMS prints).
    """
    if not raw:
        return ""
    if len(raw) > MAX_FILENAME_CHARS:
        raise Problem(
            ErrorCode.FILENAME_TOO_LONG, f"the file name is longer than {MAX_FILENAME_CHARS} characters"
        )
    if any(unicodedata.category(c) == "Cc" for c in raw):
        raise Problem(ErrorCode.INVALID_REQUEST, "the file name contains control characters")
    return raw


def storage_full(detail: str) -> Problem:
    """507 with a stable code and a retry hint: the client did nothing wrong and may try later."""
    return Problem(ErrorCode.INSUFFICIENT_STORAGE, detail, headers={"Retry-After": str(RETRY_AFTER_FULL_S)})


def too_large(cap_bytes: int) -> Problem:
    return Problem(
        ErrorCode.UPLOAD_TOO_LARGE,
        f"the upload exceeds the limit of {cap_bytes / 2**20:g} MiB (FPROTOSEG_MAX_UPLOAD_MB)",
    )


class _Sink:
    """python-multipart callbacks that route the file part to disk and fields to memory."""

    def __init__(self, temp_path: Path, cap_bytes: int) -> None:
        self.temp_path, self.cap_bytes = temp_path, cap_bytes
        self.hasher = hashlib.sha256()
        self.size = 0
        self.over_cap = False
        self.file_seen = False
        self.filename = ""
        self.fields: dict[str, str] = {}
        self.error: Problem | None = None
        self.ended = False  # the closing boundary arrived: the body was not cut off
        self._fh: IO[bytes] | None = None
        self._headers: dict[bytes, bytes] = {}
        self._hname = b""
        self._hvalue = b""
        self._part: str | None = None  # "file" | field name | None (ignored part)
        self._buf = bytearray()

    def on_part_begin(self) -> None:
        self._headers, self._part, self._buf = {}, None, bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.strip().lower()] = self._hvalue.strip()
        self._hname, self._hvalue = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = params.get(b"name", b"").decode("utf-8", "replace")
        if name == FILE_FIELD and b"filename" in params:
            if self.file_seen:
                self.error = Problem(ErrorCode.INVALID_REQUEST, "send exactly one file in the 'file' field")
                return
            self.file_seen = True
            self.filename = params[b"filename"].decode("utf-8", "replace")
            self._part = FILE_FIELD
            fd = os.open(self.temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            self._fh = os.fdopen(fd, "wb")
        elif name and len(self.fields) < MAX_FIELDS:
            self._part = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == FILE_FIELD and self._fh is not None and not self.over_cap:
            chunk = data[start:end]
            self.size += len(chunk)
            if self.size > self.cap_bytes:
                self.over_cap = True
                self._close_file()
                return
            self._fh.write(chunk)
            self.hasher.update(chunk)
        elif self._part is not None and self._part != FILE_FIELD:
            if len(self._buf) + (end - start) > FIELD_BYTE_CAPS.get(self._part, MAX_FIELD_BYTES):
                self.error = Problem(ErrorCode.INVALID_REQUEST, f"form field {self._part!r} is too long")
                self._part = None
                return
            self._buf += data[start:end]

    def on_part_end(self) -> None:
        if self._part == FILE_FIELD:
            self._close_file()
        elif self._part is not None:
            self.fields[self._part] = self._buf.decode("utf-8", "replace").strip()
        self._part = None

    def on_end(self) -> None:
        self.ended = True

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def callbacks(self) -> dict[str, object]:
        return {
            name: getattr(self, name)
            for name in (
                "on_part_begin",
                "on_header_field",
                "on_header_value",
                "on_header_end",
                "on_headers_finished",
                "on_part_data",
                "on_part_end",
                "on_end",
            )
        }


async def receive_upload(
    request: Request, uploads_dir: Path, cap_bytes: int, min_free_mb: float = 0.0
) -> ReceivedUpload:
    """Stream the request body to ``uploads_dir``; Problem 400/413/415/422 on a bad request,
    507 when the disk is (or would be) full, 503 when the data dir cannot be written.

    The caller owns the returned temp file (rename it or delete it); on any error it is removed.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise Problem(
            ErrorCode.UNSUPPORTED_MEDIA_TYPE,
            "send the slide as multipart/form-data in a field named 'file' (curl -F file=@slide.svs)",
        )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap_bytes + 1024 * 1024:
        raise too_large(cap_bytes)  # before reading a byte (curl's Expect: 100-continue gets this)

    try:
        uploads_dir.mkdir(parents=True, exist_ok=True)
        free = free_mb(uploads_dir)
    except OSError as exc:
        log.error("upload refused: the uploads dir is unusable: %s", exc)
        raise Problem(ErrorCode.STORAGE_UNAVAILABLE, "storage is unavailable; try again later") from None
    needed_mb = min_free_mb + (int(declared) / 2**20 if declared and declared.isdigit() else 0.0)
    if free < needed_mb:
        log.error("upload refused: %.0f MiB free, %.0f MiB needed (FPROTOSEG_MIN_FREE_MB)", free, needed_mb)
        raise storage_full("the server has not enough free disk space for this upload; try again later")
    temp_path = uploads_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    sink = _Sink(temp_path, cap_bytes)
    parser = MultipartParser(params[b"boundary"], sink.callbacks())
    drained = 0
    write_error: OSError | None = None  # the disk refused the slide: answered once the body is read
    try:
        async for chunk in request.stream():
            if sink.over_cap or sink.error is not None or write_error is not None:
                drained += len(chunk)
                if drained > DRAIN_LIMIT_BYTES:
                    break
                continue
            try:
                parser.write(chunk)
            except OSError as exc:  # read on (and discard): a client still sending sees the 503/507,
                write_error = exc  # not a connection reset; the partial file goes below
        if write_error is not None:
            raise write_error
        if not sink.over_cap and sink.error is None:
            parser.finalize()
    except Problem:
        _remove(temp_path)
        raise
    except OSError as exc:  # writing the slide, not the client's bytes, failed
        _discard(sink, temp_path)
        if is_out_of_space(exc):
            log.error("upload aborted: disk full after %d bytes; partial upload removed", sink.size)
            raise storage_full(
                "the server ran out of disk space during the upload; try again later"
            ) from None
        log.error("upload aborted: cannot write the upload: %s", exc)
        raise Problem(ErrorCode.STORAGE_UNAVAILABLE, "storage is unavailable; try again later") from None
    except Exception as exc:
        _discard(sink, temp_path)
        if "header size" in str(exc):  # python-multipart's cap on one part header line (4 KiB)
            raise Problem(
                ErrorCode.FILENAME_TOO_LONG,
                f"a part header is too long: keep the file name under {MAX_FILENAME_CHARS} characters",
            ) from None
        raise Problem(
            ErrorCode.MALFORMED_UPLOAD, "the multipart body is malformed or was cut off"
        ) from None
    finally:
        _discard(sink, None)

    if sink.over_cap:
        _remove(temp_path)
        raise too_large(cap_bytes)
    if sink.error is not None:
        _remove(temp_path)
        raise sink.error
    if not sink.ended:
        _remove(temp_path)
        raise Problem(ErrorCode.MALFORMED_UPLOAD, "the multipart body was cut off before its end")
    if not sink.file_seen:
        _remove(temp_path)
        raise Problem(
            ErrorCode.INVALID_REQUEST, "no file: send the slide in a multipart field named 'file'"
        )
    try:
        filename = client_filename(sink.filename)
    except Problem:
        _remove(temp_path)
        raise
    return ReceivedUpload(
        path=temp_path,
        sha256=sink.hasher.hexdigest(),
        size_bytes=sink.size,
        filename=filename,
        fields=sink.fields,
    )


def _discard(sink: _Sink, temp_path: Path | None) -> None:
    """Close the partial file (a full disk may refuse even the close) and remove it."""
    try:
        sink._close_file()
    except OSError:
        sink._fh = None
    if temp_path is not None:
        _remove(temp_path)


def _remove(temp_path: Path) -> None:
    """Remove a partial or refused upload. A volume turned read-only refuses even that (EROFS,
    whether or not the file exists): logged, never raised, so the client still gets its answer."""
    try:
        temp_path.unlink(missing_ok=True)
    except OSError as exc:
        log.error("cannot remove the partial upload %s: %s", temp_path.name, exc)
