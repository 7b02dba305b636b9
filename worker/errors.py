"""Every error of the worker layer (slide pipeline and job service), each with a stable ``code``.

One module for the layer so a reader finds every class in one place; each class names its code in
the registry (:mod:`fprotoseg.worker.error_codes`), which gives its HTTP status and CLI exit code. The slide
validation errors are raised the same way by the upload sniffer in the API and by the slide
reader in the worker, so one fault has one code wherever it is caught.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.error_codes import ErrorCode


class CodedError(FprotosegError):
    """An error whose class names its :class:`ErrorCode`: status and exit code come from there."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        code = cls.__dict__.get("code")
        if isinstance(code, ErrorCode):
            cls.http_status = code.http_status
            cls.exit_code = code.exit_code


@dataclass(frozen=True)
class FieldHint:
    """The request parameter that fixes an error, worded for each kind of client.

    The pipeline does not know whether the CLI (``--mpp``) or the API (the form field ``mpp``)
    ran it: the error keeps its fix apart from its message, and each client words it.
    """

    name: str
    example: str

    def for_cli(self) -> str:
        return f"pass it with --{self.name} (e.g. --{self.name} {self.example})"

    def for_http(self) -> str:
        return f"send it in the form field {self.name} (e.g. {self.example})"


# --- the slide file ------------------------------------------------------------------------------
class SlideError(CodedError):
    """The file cannot be read as a whole-slide image.

    ``hint``: the request parameter that fixes it, if one does; the CLI's wording of it is part of
    the message (``str(exc)``), :attr:`summary` is the message without it.
    """

    code = ErrorCode.UNREADABLE_SLIDE

    def __init__(self, message: str, *, hint: FieldHint | None = None) -> None:
        super().__init__(f"{message}; {hint.for_cli()}" if hint else message)
        self.summary = message
        self.hint = hint


class EmptySlideError(SlideError):
    """The file has no bytes at all."""

    code = ErrorCode.EMPTY_UPLOAD


class UnsupportedFormatError(SlideError):
    """The bytes are not a whole-slide image format fprotoseg reads (PNG, ZIP, text, ...)."""

    code = ErrorCode.UNSUPPORTED_FORMAT


class TruncatedSlideError(SlideError):
    """The TIFF structure or its image data points past the end of the file (a cut-off upload)."""

    code = ErrorCode.CORRUPT_SLIDE


class MissingMppError(SlideError):
    """Neither the slide metadata nor the request gives the pixel size."""

    code = ErrorCode.MISSING_MPP


class SlideTooLargeError(SlideError):
    """Dimensions beyond any real slide (decompression-bomb guard)."""

    code = ErrorCode.SLIDE_TOO_LARGE


class DicomSeriesError(SlideError):
    """A DICOM WSI folder or zip that is not one readable series (too many instances, …)."""

    code = ErrorCode.DICOM_SERIES_INVALID


class UnsafeZipError(SlideError):
    """A zip upload whose entries point outside its folder, are links, or are corrupt."""

    code = ErrorCode.UNSAFE_ZIP


class ZipTooLargeError(SlideError):
    """A zip upload with too many entries or inflating beyond the caps (a zip bomb)."""

    code = ErrorCode.ZIP_TOO_LARGE


class PipelineOptionsError(CodedError):
    """A pipeline option (batch size, output µm/px, ...) is out of range."""

    code = ErrorCode.INVALID_OPTIONS


class RoiError(CodedError):
    """The region of interest is not a usable polygon: malformed, empty, self-intersecting, too
    large, or off the slide. The message says which, in one line."""

    code = ErrorCode.INVALID_ROI


class UploadChangedError(SlideError):
    """The stored upload no longer has the sha256 recorded when it was received."""

    code = ErrorCode.UPLOAD_CHANGED


# --- running a job -------------------------------------------------------------------------------
class JobCancelledError(CodedError):
    """The job was cancelled while running; raised at the next batch boundary."""

    code = ErrorCode.CANCELLED


class JobInterrupted(CodedError):
    """The worker is shutting down; the job goes back to the queue to be resumed."""

    code = ErrorCode.INTERRUPTED


class JobTimeLimitError(CodedError):
    """The job ran longer than FPROTOSEG_JOB_SOFT_TIME_LIMIT_S."""

    code = ErrorCode.TIME_LIMIT


class TransientJobError(CodedError):
    """A failure worth retrying (the job store or broker blinked); the job stays queued."""

    code = ErrorCode.TRANSIENT_ERROR


class JobStoreError(CodedError):
    """The job store (SQLite file or Redis) cannot be reached or written."""

    code = ErrorCode.JOBSTORE_UNAVAILABLE


class BrokerUnavailableError(CodedError):
    """The Celery broker (Redis) did not take the job."""

    code = ErrorCode.BROKER_UNAVAILABLE


class DuplicateJobError(CodedError):
    """A job with this Idempotency-Key exists already; ``existing_id`` names it."""

    code = ErrorCode.DUPLICATE_JOB

    def __init__(self, existing_id: str) -> None:
        super().__init__(f"a job with this Idempotency-Key exists: {existing_id}")
        self.existing_id = existing_id


class SegmenterOutputError(CodedError):
    """The network returned scores of the wrong shape for the tiles it was given."""

    code = ErrorCode.SEGMENTER_ERROR


# --- slide quality control -----------------------------------------------------------------------
class QcRefusedError(CodedError):
    """Slide QC found a problem and the QC policy is ``refuse``: the job fails before inference.

    One class for the four QC codes (``not_brightfield_he``, ``stain_out_of_range``, ...): the code
    of the first failed check is set per instance, with that code's status and exit code, so a
    LIMS keys on the same code it would find among the warnings under ``warn``.
    """

    code = ErrorCode.NOT_BRIGHTFIELD_HE

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = code.http_status
        self.exit_code = code.exit_code
