"""The networks of this worker process, loaded once each and reused by every job that names them.

A Celery child or the embedded worker loads the default model before the first job (start-up
preload) and keeps it: loading costs seconds, a job may take only a few. A job may name another
model (``model=NAME``, :mod:`fprotoseg.model.catalog`); the process keeps the
``FPROTOSEG_MODEL_CACHE_SIZE`` most recently used ones loaded (each costs its weights in memory, on
the GPU too), keyed by file, size and modification time, so a checkpoint replaced on disk is
loaded afresh. Device and precision come from :class:`~fprotoseg.worker.service.settings.Settings`;
``auto`` is resolved by :func:`fprotoseg.model.segmenter.choose_device_and_precision`, the rule the
CLI uses.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from fprotoseg.worker.service.settings import Settings

if TYPE_CHECKING:
    from fprotoseg.model.segmenter import Segmenter

log = logging.getLogger(__name__)

_CacheKey = tuple[str, int, int, str, str]
_cache: OrderedDict[_CacheKey, Segmenter] = OrderedDict()
_lock = threading.Lock()


def find_model(settings: Settings, name: str) -> tuple[Path, str]:
    """(the checkpoint of the installed model ``name``, the default model's name).

    The one place a model name is refused: UnknownModelError listing the installed names, for a
    request naming one (``422 unknown_model``) and for a job whose model was removed after it was
    accepted.
    """
    from fprotoseg.model.catalog import installed_models
    from fprotoseg.model.errors import UnknownModelError

    models, default = installed_models(settings.checkpoint, settings.models_dir)
    if name not in models:
        known = sorted(models)
        raise UnknownModelError(
            f"unknown model {name[:100]!r}; known models: {', '.join(known) or '(none)'}", known
        )
    return models[name].path, default


def checkpoint_for(settings: Settings, model: str | None) -> Path:
    """The checkpoint file of ``model`` (None = the configured default)."""
    from fprotoseg.model.catalog import resolve_checkpoint

    if model is None:
        return resolve_checkpoint(settings.checkpoint, settings.models_dir)
    return find_model(settings, model)[0]


def get_segmenter(settings: Settings, model: str | None = None) -> Segmenter:
    """The loaded segmenter for ``model`` (None = FPROTOSEG_CHECKPOINT or the packaged default)."""
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.segmenter import choose_device_and_precision

    device, precision = choose_device_and_precision(settings.device, settings.precision)
    path = checkpoint_for(settings, model)
    stat = path.stat()
    key: _CacheKey = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, device, precision)
    with _lock:  # one load at a time: two threads asking for one model must not load it twice
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
        log.info("loading model %s (%s) on %s/%s", model or "(default)", path.name, device, precision)
        segmenter = load_segmenter(path, device=device, precision=precision)
        _cache[key] = segmenter
        while len(_cache) > settings.model_cache_size:
            evicted, _ = _cache.popitem(last=False)
            log.info("model %s unloaded (FPROTOSEG_MODEL_CACHE_SIZE=%d)", Path(evicted[0]).name,
                     settings.model_cache_size)
        return segmenter


def cached_models() -> int:
    """How many models this process holds loaded (tests, metrics)."""
    with _lock:
        return len(_cache)
