"""Slides by reference: ``POST /segment`` with a JSON body naming a slide instead of uploading it.

Labs keep their scans on a file share or in object storage; sending 2–4 GB over HTTP per job is
waste. Two kinds of reference:

- ``file:///…``: a path under one of ``FPROTOSEG_SLIDE_ROOTS`` (read-only mounts). The path is
  percent-decoded once, must be absolute, may hold no ``..`` segment, no ``%`` left after decoding
  (double encoding), no NUL or backslash, and after resolving every symlink it must still lie
  inside a root (also resolved): a link out of the root is refused like ``..``. The worker reads
  the slide where it is; the service never writes or deletes it.
- ``s3://bucket/key``: streamed (size-capped: ``FPROTOSEG_SLIDE_CACHE_MAX_MB``, checked from the
  object's size before a byte is read and again while streaming) into the uploads directory, where
  it is the job's own copy like an upload (``FPROTOSEG_KEEP_UPLOADS``, retention). Credentials
  come from the usual AWS environment; ``FPROTOSEG_S3_ENDPOINT_URL`` points at a non-AWS store.
  Needs the optional extra ``fprotoseg[s3]`` (s3fs).

Either way the bytes are then sniffed and hashed exactly like an upload, so the same checks and
the same idempotency rules apply. Every refusal is a 4xx problem and leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from fastapi import Request

from fprotoseg.app.errors import Problem
from fprotoseg.app.json_body import read_json_body
from fprotoseg.app.routes.segment_models import SegmentFields, SegmentReference
from fprotoseg.app.upload import TEMP_PREFIX, client_filename, storage_full
from fprotoseg.model.digest import file_sha256_and_size
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.service.storage import FILE_MODE, free_mb, is_out_of_space
from fprotoseg.worker.wsi.dicom import DICOM_FOLDER_SUFFIX, folder_sha256, series_files, unpack_series_zip
from fprotoseg.worker.wsi.roi import MAX_ROI_BYTES

MAX_JSON_BODY_BYTES = 16 * 1024 + MAX_ROI_BYTES  # the fields, and room for a region of interest
HASH_CHUNK_BYTES = 1 << 20


@dataclass
class IncomingSlide:
    """A slide ready for sniffing: on disk, hashed, with the request's other fields as strings.

    ``owned``: the file is this request's temp copy (an upload or a fetched object), moved into the
    uploads directory for the job or removed; a referenced file is never moved or removed.
    """

    path: Path
    sha256: str
    size_bytes: int
    filename: str
    owned: bool
    slide_uri: str | None = None
    form: dict[str, str] = field(default_factory=dict)  # an upload's other form fields, as sent
    request: SegmentFields | None = None  # a JSON body's fields, validated as it was read


def _hash_series(folder: Path, max_files: int) -> tuple[str, int]:
    return folder_sha256(series_files(folder, max_files), folder)


def unpack_dicom_zip(upload: IncomingSlide, settings: Settings) -> IncomingSlide:
    """An uploaded zip of one DICOM WSI series, unpacked (safely, within the caps) into a temp folder
    in the uploads dir; the zip itself is removed. The sha256 and size stay those of the zip sent."""
    folder = settings.uploads_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}{DICOM_FOLDER_SUFFIX}"
    try:
        unpack_series_zip(
            upload.path,
            folder,
            max_files=settings.dicom_zip_max_files,
            max_bytes=int(settings.dicom_zip_max_mb * 2**20),
        )
    except OSError as exc:
        if is_out_of_space(exc):
            raise storage_full("the server ran out of disk space while unpacking the zip") from None
        raise
    finally:
        upload.path.unlink(missing_ok=True)
    return IncomingSlide(
        folder, upload.sha256, upload.size_bytes, upload.filename, owned=True, form=upload.form
    )


def remove_incoming(path: Path) -> None:
    """Remove a temp copy (a file, or the folder of an unpacked DICOM zip)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def resolve_file_uri(uri: str, roots: list[Path]) -> Path:
    """The real path a ``file://`` URI names, if it lies inside a root; a 4xx problem otherwise."""
    if not roots:
        raise Problem(
            ErrorCode.SLIDE_ROOTS_UNSET,
            "slides by path are not enabled on this server (FPROTOSEG_SLIDE_ROOTS is unset)",
        )
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
        raise Problem(
            ErrorCode.INVALID_SLIDE_URI, "a file URI is file:///absolute/path (no host, query or fragment)"
        )
    decoded = unquote(parts.path, errors="strict")
    if not decoded.startswith("/") or "\x00" in decoded or "\\" in decoded or "%" in decoded:
        raise Problem(
            ErrorCode.INVALID_SLIDE_URI,
            "the slide path must be absolute and encoded once, without NUL or backslash",
        )
    if any(segment in ("..", ".") for segment in decoded.split("/")):
        raise Problem(ErrorCode.SLIDE_PATH_FORBIDDEN, "the slide path may not contain '.' or '..' segments")
    try:
        real = Path(decoded).resolve(strict=True)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        real = None
    real_roots = [r.resolve() for r in roots]
    if real is None:
        inside = any(
            Path(decoded).is_relative_to(r) or Path(decoded).is_relative_to(raw)
            for r, raw in zip(real_roots, roots, strict=True)
        )
        if inside:
            raise Problem(ErrorCode.SLIDE_NOT_FOUND, "no slide at this path under the slide roots")
        raise Problem(ErrorCode.SLIDE_PATH_FORBIDDEN, "the slide path is outside FPROTOSEG_SLIDE_ROOTS")
    if not any(real.is_relative_to(r) for r in real_roots):
        # a symlink (or an absolute path) leading out of every root
        raise Problem(ErrorCode.SLIDE_PATH_FORBIDDEN, "the slide path is outside FPROTOSEG_SLIDE_ROOTS")
    if not real.is_file() and not real.is_dir():
        raise Problem(ErrorCode.INVALID_SLIDE_URI, "the slide path is neither a file nor a folder")
    return real


def _s3_filesystem(settings: Settings) -> Any:
    try:
        import s3fs
    except ImportError:
        raise Problem(
            ErrorCode.S3_UNAVAILABLE,
            "s3:// slides need the optional extra on this server: pip install 'fprotoseg[s3]'",
        ) from None
    client_kwargs = {"endpoint_url": settings.s3_endpoint_url} if settings.s3_endpoint_url else {}
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, skip_instance_cache=True)


def fetch_s3(uri: str, settings: Settings) -> IncomingSlide:
    """Stream ``s3://bucket/key`` into a temp file in the uploads dir, hashing, within the cap."""
    parts = urlsplit(uri)
    key = parts.path.lstrip("/")
    if not parts.netloc or not key or parts.query or parts.fragment:
        raise Problem(ErrorCode.INVALID_SLIDE_URI, "an object URI is s3://bucket/key")
    cap_bytes = int(settings.slide_cache_max_mb * 2**20)
    fs = _s3_filesystem(settings)
    location = f"{parts.netloc}/{key}"
    try:
        info = fs.info(location)
    except FileNotFoundError:
        raise Problem(ErrorCode.SLIDE_NOT_FOUND, f"no object {uri[:200]!r}") from None
    except PermissionError:
        raise Problem(ErrorCode.SLIDE_ACCESS_DENIED, f"access to {uri[:200]!r} was denied") from None
    except Exception as exc:  # botocore's own errors (no credentials, bad endpoint, …) too: never a 500
        raise Problem(
            ErrorCode.OBJECT_STORE_ERROR, f"the object store did not answer ({type(exc).__name__})"
        ) from None
    size = int(info.get("size") or 0)
    if info.get("type") == "directory":
        raise Problem(ErrorCode.INVALID_SLIDE_URI, "the object URI names a prefix, not an object")
    if size > cap_bytes:
        raise Problem(
            ErrorCode.SLIDE_TOO_LARGE_FOR_CACHE,
            f"the object is {size / 2**20:.1f} MiB, over the {settings.slide_cache_max_mb:g} MiB cap "
            "(FPROTOSEG_SLIDE_CACHE_MAX_MB)",
        )
    if free_mb(settings.uploads_dir) - size / 2**20 < settings.min_free_mb:
        raise storage_full("the server has not enough free disk space for this slide; try again later")
    tmp = settings.uploads_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    digest, received = hashlib.sha256(), 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
        with os.fdopen(fd, "wb") as out, fs.open(location, "rb", block_size=8 * HASH_CHUNK_BYTES) as src:
            while chunk := src.read(HASH_CHUNK_BYTES):
                received += len(chunk)
                if received > cap_bytes:  # the object grew after info()
                    raise Problem(
                        ErrorCode.SLIDE_TOO_LARGE_FOR_CACHE,
                        "the object is over the cap (FPROTOSEG_SLIDE_CACHE_MAX_MB)",
                    )
                digest.update(chunk)
                out.write(chunk)
    except Problem:
        tmp.unlink(missing_ok=True)
        raise
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if is_out_of_space(exc):
            raise storage_full("the server ran out of disk space while fetching the slide") from None
        raise Problem(
            ErrorCode.OBJECT_STORE_ERROR, f"reading the object failed ({type(exc).__name__})"
        ) from None
    return IncomingSlide(tmp, digest.hexdigest(), received, key.rsplit("/", 1)[-1], owned=True, slide_uri=uri)


async def receive_reference(request: Request, settings: Settings) -> IncomingSlide:
    """Parse the JSON body and bring the named slide to a hashed file (see the module docstring)."""
    doc = await read_json_body(request, MAX_JSON_BODY_BYTES)
    return await open_reference(SegmentReference.from_json(doc), settings)


async def open_reference(fields: SegmentReference, settings: Settings) -> IncomingSlide:
    """The slide a validated reference names, hashed (read where it is, or fetched): what
    ``POST /segment`` and each slide of ``POST /cohorts`` admit."""
    from fastapi.concurrency import run_in_threadpool

    uri = fields.slide_uri
    scheme = urlsplit(uri).scheme.lower()
    if scheme == "file":
        path = resolve_file_uri(uri, settings.slide_roots)
        if path.is_dir():  # a DICOM WSI series: hashed over its instances (worker/wsi/dicom.py)
            sha256, size = await run_in_threadpool(_hash_series, path, settings.dicom_zip_max_files)
        else:
            sha256, size = await run_in_threadpool(file_sha256_and_size, path)
        incoming = IncomingSlide(path, sha256, size, client_filename(path.name), owned=False, slide_uri=uri)
    elif scheme == "s3":
        incoming = await run_in_threadpool(fetch_s3, uri, settings)
        incoming.filename = client_filename(incoming.filename)
    else:
        raise Problem(ErrorCode.INVALID_SLIDE_URI, "slide_uri must start with file:// or s3://")
    incoming.request = fields
    return incoming
