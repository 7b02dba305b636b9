"""The root of the one exception hierarchy of fprotoseg, and the model layer's own errors.

Every error a user can cause carries a stable machine-readable ``code`` (used in job records and
HTTP problem bodies), an ``http_status`` (what the API answers when it surfaces in a request),
an ``exit_code`` (what the CLI exits with) and a one-line human message. Lives in ``model``
because that is the bottom of the dependency chain (app -> worker -> model); it imports nothing
heavy. Each layer keeps its errors in one module: this one, ``fprotoseg.worker.errors`` and
``fprotoseg.app.errors``; ``fprotoseg.app.problems`` maps them to HTTP by class.
"""

from __future__ import annotations


class FprotosegError(Exception):
    """Base class: an expected failure with a code and a one-line message (never a traceback)."""

    code: str = "error"
    http_status: int = 400
    exit_code: int = 2

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ConfigurationError(FprotosegError):
    """A setting or a training config is missing or inconsistent; the message names what to fix."""

    code = "configuration_error"
    http_status = 500


class CheckpointError(FprotosegError):
    """A checkpoint file is missing, corrupt, foreign, or not a fprotoseg checkpoint."""

    code = "invalid_checkpoint"
    http_status = 500


class DeviceError(FprotosegError):
    """The requested device/precision combination is not available here."""

    code = "device_unavailable"
    http_status = 500


class DatasetError(FprotosegError):
    """A dataset folder or file does not follow the expected layout."""

    code = "dataset"


class TextEmbeddingError(FprotosegError):
    """Class prompt embeddings could not be produced (missing extra, bad file)."""

    code = "text_embeddings"


class UnknownModelError(CheckpointError):
    """A model name that no checkpoint in the packaged weights or FPROTOSEG_MODELS_DIR carries."""

    code = "unknown_model"
    http_status = 422

    def __init__(self, message: str, known: list[str]) -> None:
        super().__init__(message)
        self.known = known
