"""FProtoSeg: the network, its training, evaluation and checkpoints.

No web, no Celery. Importing this package is cheap (no torch): the worker and the API reach the
network only through :func:`load_segmenter` and the :class:`~fprotoseg.model.segmenter.Segmenter` protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from fprotoseg.model.checkpoint import DEFAULT_CHECKPOINT

if TYPE_CHECKING:
    from fprotoseg.model.segmenter import Segmenter

__all__ = ["DEFAULT_CHECKPOINT", "load_segmenter"]


def load_segmenter(
    path: str | Path | None = None,
    *,
    device: str = "auto",
    precision: str = "fp32",
    num_threads: int | None = None,
) -> Segmenter:
    """Load a checkpoint (``None`` = the packaged default) into a ready-to-call Segmenter.

    Imported lazily so that ``import fprotoseg.model`` never pulls torch into the API process.
    """
    from fprotoseg.model.segmenter import load_segmenter as _load

    return _load(path, device=device, precision=precision, num_threads=num_threads)
