"""Architecture registry: manifest ``architecture`` name -> inference module builder.

Each builder takes the manifest ``config`` and the manifest itself and returns an ``nn.Module``
whose forward maps a normalised NCHW batch to class scores (N, C, H/stride, W/stride) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from model.errors import CheckpointError

Builder = Callable[[dict[str, Any], dict[str, Any]], Any]
_BUILDERS: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _BUILDERS[name] = fn
        return fn

    return deco


def _ensure_registered() -> None:
    # Importing the architecture modules registers their builders.
    import model.fprotoseg
    import model.tiny  # noqa: F401


def build_inference_module(manifest: dict[str, Any], state_dict: dict[str, Any]) -> Any:
    """Rebuild the network named in the manifest and load its weights strictly."""
    _ensure_registered()
    arch = manifest["architecture"]
    if arch not in _BUILDERS:
        raise CheckpointError(f"unknown architecture {arch!r} (known: {', '.join(sorted(_BUILDERS))})")
    module = _BUILDERS[arch](manifest["config"], manifest)
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not match architecture {arch!r}: {first}") from None
    return module
