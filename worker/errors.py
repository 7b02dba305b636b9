"""Errors of slide reading and the pipeline, each with a stable ``code``."""

from __future__ import annotations

from model.errors import FprotosegError


class SlideError(FprotosegError):
    """The file cannot be read as a whole-slide image."""

    code = "unreadable_slide"


class UnsupportedFormatError(SlideError):
    code = "unsupported_format"


class MissingMppError(SlideError):
    """Neither the slide metadata nor the request gives the pixel size."""

    code = "missing_mpp"


class SlideTooLargeError(SlideError):
    """Dimensions beyond any real slide (decompression-bomb guard)."""

    code = "slide_too_large"


class JobCancelledError(FprotosegError):
    """The job was cancelled while running; raised at the next batch boundary."""

    code = "cancelled"
