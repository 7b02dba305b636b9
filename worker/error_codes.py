"""The registry of every error code fprotoseg returns: one place for its HTTP status, CLI exit code
and the hint a client acts on.

LIMS clients branch on these codes (in problem bodies and in a failed job's ``error.code``), so a
code is written here once and everywhere else named by its member (``ErrorCode.INVALID_REQUEST``),
never as a string. The error table in docs/service.md is checked against this registry by a test.
Stdlib only, at the bottom of the worker layer: the API, the worker and the CLI all import it.

A member *is* its code string (``ErrorCode.MISSING_MPP == "missing_mpp"``), so it serialises as
the plain code in JSON, in job records and in f-strings.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["ErrorCode"]

# exit codes of the CLI (sysexits.h): 2 = usage/data error (argparse's too), 75 = try again later
_EXIT_USAGE = 2
_EXIT_TEMPFAIL = 75
_EXIT_DATAERR = 65  # the slide is readable but not one the model should answer for (QC refused it)


class ErrorCode(str, Enum):
    """A stable error code with its HTTP status, CLI exit code and what the client should do."""

    http_status: int
    exit_code: int
    hint: str

    def __new__(cls, code: str, http_status: int, hint: str, exit_code: int = _EXIT_USAGE) -> ErrorCode:
        member = str.__new__(cls, code)
        member._value_ = code
        member.http_status = http_status
        member.exit_code = exit_code
        member.hint = hint
        return member

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    # --- the request -----------------------------------------------------------------------------
    INVALID_REQUEST = ("invalid_request", 422, "fix the field the detail names and send again")
    INVALID_ARGUMENT = ("invalid_argument", 422, "fix the command-line argument the message names")
    MALFORMED_UPLOAD = ("malformed_upload", 400, "send the multipart body again, complete")
    FILENAME_TOO_LONG = ("filename_too_long", 422, "send a file name of at most 1024 characters")
    UPLOAD_TOO_LARGE = ("upload_too_large", 413, "name the slide by URI instead of uploading it")
    UNSUPPORTED_MEDIA_TYPE = ("unsupported_media_type", 415, "send multipart/form-data or a JSON body")
    UNAUTHORIZED = ("unauthorized", 401, "send a valid X-API-Key header")
    NOT_FOUND = ("not_found", 404, "check the URL")
    METHOD_NOT_ALLOWED = ("method_not_allowed", 405, "use a method the Allow header names")
    HTTP_ERROR = ("http_error", 400, "check the request against GET /openapi.json")
    UNKNOWN_MODEL = ("unknown_model", 422, "choose a name from GET /models")
    IDEMPOTENCY_KEY_REUSED = ("idempotency_key_reused", 422, "use a new Idempotency-Key for new parameters")
    DUPLICATE_JOB = ("duplicate_job", 409, "the job named in the detail exists already; poll it")
    CONFLICT = ("conflict", 409, "retry the same request in a moment")
    # --- slides named by URI ---------------------------------------------------------------------
    INVALID_SLIDE_URI = ("invalid_slide_uri", 422, "name the slide as file://<path> or s3://bucket/key")
    SLIDE_NOT_FOUND = ("slide_not_found", 404, "check the slide URI")
    SLIDE_PATH_FORBIDDEN = ("slide_path_forbidden", 403, "name a slide under FPROTOSEG_SLIDE_ROOTS")
    SLIDE_ROOTS_UNSET = ("slide_roots_unset", 403, "the operator sets FPROTOSEG_SLIDE_ROOTS")
    SLIDE_ACCESS_DENIED = ("slide_access_denied", 403, "grant the service read access to the object")
    S3_UNAVAILABLE = ("s3_unavailable", 422, "the operator installs the s3 extra to read s3:// URIs")
    OBJECT_STORE_ERROR = ("object_store_error", 502, "retry later; the object store did not answer")
    SLIDE_TOO_LARGE_FOR_CACHE = ("slide_too_large_for_cache", 413, "upload the slide instead")
    # --- the slide file --------------------------------------------------------------------------
    UNREADABLE_SLIDE = ("unreadable_slide", 422, "send a whole-slide image file")
    EMPTY_UPLOAD = ("empty_upload", 400, "send the slide's bytes")
    UNSUPPORTED_FORMAT = ("unsupported_format", 415, "send a format docs/service.md lists")
    CORRUPT_SLIDE = ("corrupt_slide", 422, "the file is cut off or damaged; send the complete file")
    MISSING_MPP = ("missing_mpp", 422, "send the pixel size in the mpp field (CLI: --mpp)")
    SLIDE_TOO_LARGE = ("slide_too_large", 422, "the slide's dimensions are beyond any real slide")
    DICOM_SERIES_INVALID = ("dicom_series_invalid", 422, "send one DICOM WSI series per folder or zip")
    UNSAFE_ZIP = ("unsafe_zip", 422, "send a zip without links or paths outside its folder")
    ZIP_TOO_LARGE = ("zip_too_large", 413, "send a zip within the entry and size caps")
    UPLOAD_CHANGED = ("upload_changed", 500, "upload the slide again")
    INVALID_OPTIONS = ("invalid_options", 422, "fix the pipeline option the message names")
    INVALID_ROI = ("invalid_roi", 422, "send one GeoJSON polygon (level-0 px) that lies on the slide")
    # --- slide quality control (warnings under qc_policy=warn, the job's error under refuse) -----
    NOT_BRIGHTFIELD_HE = (
        "not_brightfield_he", 422, "send a brightfield H&E slide (or qc_policy=warn to run it anyway)",
        _EXIT_DATAERR,
    )
    STAIN_OUT_OF_RANGE = (
        "stain_out_of_range", 422, "the stain differs from the model's training slides; check the result",
        _EXIT_DATAERR,
    )
    MPP_OUTSIDE_MODEL_RANGE = (
        "mpp_outside_model_range", 422, "send a slide scanned at the resolution GET /models states",
        _EXIT_DATAERR,
    )
    ARTEFACT_AREA_HIGH = (
        "artefact_area_high", 422, "rescan or recut the slide; qc.json lists the artefact areas",
        _EXIT_DATAERR,
    )
    # --- running a job ---------------------------------------------------------------------------
    CANCELLED = ("cancelled", 409, "the job was cancelled; submit it again to run it")
    INTERRUPTED = ("interrupted", 503, "none: the job is requeued and resumes", _EXIT_TEMPFAIL)
    TIME_LIMIT = ("time_limit", 500, "the slide took longer than the job time limit; ask the operator")
    WORKER_LOST = ("worker_lost", 500, "submit the slide again; the operator checks the worker logs")
    DISK_FULL = ("disk_full", 507, "submit the slide again later")
    OUT_OF_MEMORY = ("out_of_memory", 500, "the operator gives the worker more memory")
    SEGMENTER_ERROR = ("segmenter_error", 500, "the operator checks the model checkpoint")
    INTERNAL_ERROR = ("internal_error", 500, "report it; the server log has the details")
    # --- the service -----------------------------------------------------------------------------
    JOB_NOT_FOUND = ("job_not_found", 404, "check the job id")
    COHORT_NOT_FOUND = ("cohort_not_found", 404, "check the cohort id")
    JOB_FINISHED = ("job_finished", 409, "none: the job has ended already")
    RESULTS_NOT_READY = ("results_not_ready", 409, "poll GET /jobs/{id} until it succeeded")
    RESULTS_MISSING = ("results_missing", 404, "submit the slide again (the results were removed)")
    VIEWER_MISSING = ("viewer_missing", 404, "the viewer was not rendered for this job")
    SEG_NOT_AVAILABLE = ("seg_not_available", 404, "DICOM SEG is written for DICOM WSI input only")
    PROBABILITIES_NOT_REQUESTED = (
        "probabilities_not_requested", 404, "submit the slide again with outputs=probabilities"
    )
    VIEW_LINK_INVALID = ("view_link_invalid", 401, "ask GET /jobs/{id} for a new view_url")
    NOT_READY = ("not_ready", 503, "retry later; `checks` says which part is not ready")
    INSUFFICIENT_STORAGE = ("insufficient_storage", 507, "retry after Retry-After")
    STORAGE_UNAVAILABLE = ("storage_unavailable", 503, "retry after Retry-After")
    TRANSIENT_ERROR = ("transient_error", 503, "retry after Retry-After", _EXIT_TEMPFAIL)
    JOBSTORE_UNAVAILABLE = ("jobstore_unavailable", 503, "retry after Retry-After", _EXIT_TEMPFAIL)
    BROKER_UNAVAILABLE = ("broker_unavailable", 503, "retry after Retry-After", _EXIT_TEMPFAIL)
    # --- the model and its configuration (raised by fprotoseg.model) -----------------------------
    CONFIGURATION_ERROR = ("configuration_error", 500, "fix the setting or config key the message names")
    INVALID_CHECKPOINT = ("invalid_checkpoint", 500, "point FPROTOSEG_CHECKPOINT at a fprotoseg checkpoint")
    DEVICE_UNAVAILABLE = ("device_unavailable", 500, "choose a device and precision this host has")
    DATASET = ("dataset", 400, "lay the dataset out as docs/model.md describes")
    TEXT_EMBEDDINGS = ("text_embeddings", 400, "install the train extra or fix the embeddings file")
