"""Every error of the worker layer (slide pipeline and job service), each with a stable ``code``.

One module for the layer so a reader finds every code in one place; the HTTP status and CLI exit
code come with each class (see :class:`fprotoseg.model.errors.FprotosegError`). The slide
validation errors are raised the same way by the upload sniffer in the API and by the slide
reader in the worker, so one fault has one code wherever it is caught.
"""

from __future__ import annotations

from fprotoseg.model.errors import FprotosegError


# --- the slide file ------------------------------------------------------------------------------
class SlideError(FprotosegError):
    """The file cannot be read as a whole-slide image."""

    code = "unreadable_slide"
    http_status = 422


class EmptySlideError(SlideError):
    """The file has no bytes at all."""

    code = "empty_upload"
    http_status = 400


class UnsupportedFormatError(SlideError):
    """The bytes are not a whole-slide image format fprotoseg reads (PNG, ZIP, text, ...)."""

    code = "unsupported_format"
    http_status = 415


class TruncatedSlideError(SlideError):
    """The TIFF structure or its image data points past the end of the file (a cut-off upload)."""

    code = "corrupt_slide"
    http_status = 422


class MissingMppError(SlideError):
    """Neither the slide metadata nor the request gives the pixel size."""

    code = "missing_mpp"


class SlideTooLargeError(SlideError):
    """Dimensions beyond any real slide (decompression-bomb guard)."""

    code = "slide_too_large"


class DicomSeriesError(SlideError):
    """A DICOM WSI folder or zip that is not one readable series (too many instances, …)."""

    code = "dicom_series_invalid"
    http_status = 422


class UnsafeZipError(SlideError):
    """A zip upload whose entries point outside its folder, are links, or are corrupt."""

    code = "unsafe_zip"
    http_status = 422


class ZipTooLargeError(SlideError):
    """A zip upload with too many entries or inflating beyond the caps (a zip bomb)."""

    code = "zip_too_large"
    http_status = 413


class PipelineOptionsError(FprotosegError):
    """A pipeline option (batch size, output µm/px, ...) is out of range."""

    code = "invalid_options"
    http_status = 422


class UploadChangedError(SlideError):
    """The stored upload no longer has the sha256 recorded when it was received."""

    code = "upload_changed"
    http_status = 500


# --- running a job -------------------------------------------------------------------------------
class JobCancelledError(FprotosegError):
    """The job was cancelled while running; raised at the next batch boundary."""

    code = "cancelled"
    http_status = 409


class JobInterrupted(FprotosegError):
    """The worker is shutting down; the job goes back to the queue to be resumed."""

    code = "interrupted"
    http_status = 503


class JobTimeLimitError(FprotosegError):
    """The job ran longer than FPROTOSEG_JOB_SOFT_TIME_LIMIT_S."""

    code = "time_limit"
    http_status = 500


class TransientJobError(FprotosegError):
    """A failure worth retrying (the job store or broker blinked); the job stays queued."""

    code = "transient_error"
    http_status = 503
    exit_code = 75  # EX_TEMPFAIL


class JobStoreError(FprotosegError):
    """The job store (SQLite file or Redis) cannot be reached or written."""

    code = "jobstore_unavailable"
    http_status = 503
    exit_code = 75


class BrokerUnavailableError(FprotosegError):
    """The Celery broker (Redis) did not take the job."""

    code = "broker_unavailable"
    http_status = 503
    exit_code = 75


class DuplicateJobError(FprotosegError):
    """A job with this Idempotency-Key exists already; ``existing_id`` names it."""

    code = "duplicate_job"
    http_status = 409

    def __init__(self, existing_id: str) -> None:
        super().__init__(f"a job with this Idempotency-Key exists: {existing_id}")
        self.existing_id = existing_id


class SegmenterOutputError(FprotosegError):
    """The network returned scores of the wrong shape for the tiles it was given."""

    code = "segmenter_error"
    http_status = 500
