"""Architecture registry: manifest ``architecture`` name -> inference module builder.

Each builder takes the manifest ``config`` and the manifest itself and returns an ``nn.Module``
whose forward maps a normalised NCHW batch to class scores (N, C, H/stride, W/stride) in [0, 1].
This module is a leaf: the architecture modules import it to register themselves, and
:func:`fprotoseg.model.segmenter.build_inference_module` imports them (never the other way
round, so there is no import loop).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fprotoseg.model.errors import CheckpointError

Builder = Callable[[dict[str, Any], dict[str, Any]], Any]
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn

    return deco


def builder(name: str) -> Builder:
    """The registered builder of ``name``; CheckpointError naming the known ones if there is none."""
    if name not in _BUILDERS:
        raise CheckpointError(f"unknown architecture {name!r} (known: {', '.join(sorted(_BUILDERS))})")
    return _BUILDERS[name]
