"""The network of this worker process, loaded once and reused by every job it runs.

A Celery child or the embedded worker loads its model before the first job (start-up preload)
and keeps it: loading costs seconds, a job may take only a few. The checkpoint, device and
precision come from :class:`~fprotoseg.worker.service.settings.Settings`; ``auto`` is resolved by
:func:`fprotoseg.model.segmenter.choose_device_and_precision`, the same rule the CLI uses.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING

from fprotoseg.worker.service.settings import Settings

if TYPE_CHECKING:
    from fprotoseg.model.segmenter import Segmenter

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=2)
def _load_cached(checkpoint: str | None, device: str, precision: str) -> Segmenter:
    from fprotoseg.model import load_segmenter

    log.info("loading model %s on %s/%s", checkpoint or "(packaged default)", device, precision)
    return load_segmenter(checkpoint, device=device, precision=precision)


def get_segmenter(settings: Settings) -> Segmenter:
    """The segmenter of this process for ``settings`` (FPROTOSEG_CHECKPOINT, _DEVICE, _PRECISION)."""
    from fprotoseg.model.segmenter import choose_device_and_precision

    device, precision = choose_device_and_precision(settings.device, settings.precision)
    checkpoint = str(settings.checkpoint) if settings.checkpoint else None
    return _load_cached(checkpoint, device, precision)
