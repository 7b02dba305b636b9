"""FProtoSeg: the network, its training, evaluation and checkpoints.

No web, no Celery. Importing this package is cheap (no torch): the worker and the API reach the
network only through :func:`load_segmenter` and the :class:`~model.segmenter.Segmenter` protocol.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.segmenter import Segmenter

DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "fprotoseg_wsss4luad.safetensors"


def load_segmenter(
    path: str | Path | None = None,
    *,
    device: str = "auto",
    precision: str = "fp32",
    num_threads: int | None = None,
) -> Segmenter:
    """Load a checkpoint (``None`` = the packaged default) into a ready-to-call Segmenter.

    Imported lazily so that ``import model`` never pulls torch into the API process.
    """
    from model.segmenter import load_segmenter as _load

    return _load(path, device=device, precision=precision, num_threads=num_threads)
