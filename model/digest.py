"""The sha256 of a file, streamed: the one implementation the API (uploads named by path, DICOM
series), the slide pipeline (provenance) and the model (checkpoint checksums) share.

Stdlib only, so the API imports it without numpy or torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["CHUNK_BYTES", "file_sha256", "file_sha256_and_size"]

# slides and checkpoints are tens of MB to GB: never read whole
CHUNK_BYTES = 1 << 20


def file_sha256_and_size(path: Path) -> tuple[str, int]:
    """(hex sha256, bytes) of the file's contents."""
    digest, size = hashlib.sha256(), 0
    with Path(path).open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file's contents."""
    return file_sha256_and_size(path)[0]
