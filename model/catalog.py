"""Which models this installation has: every ``*.safetensors`` in the packaged weights folder and
in ``FPROTOSEG_MODELS_DIR``, named by file stem, described by their manifests.

Why a catalogue of files: a lab runs more than one model (this repository packages a second one,
for BCSS-WSSS breast tissue), and the API must list them and check a requested name without
importing torch or safetensors: a checkpoint's manifest sits in the safetensors header (8 bytes of
length, then JSON), so reading it is a small read, never a load. The name is the file stem
(``fprotoseg_wsss4luad``), which the operator controls and which stays put when a model is retrained;
a file in ``FPROTOSEG_MODELS_DIR`` with the name of a packaged one replaces it. Stdlib only.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fprotoseg.model.checkpoint import DEFAULT_CHECKPOINT, MANIFEST_KEY
from fprotoseg.model.errors import CheckpointError, UnknownModelError

PACKAGED_WEIGHTS_DIR = DEFAULT_CHECKPOINT.parent
DEFAULT_MODEL_NAME = DEFAULT_CHECKPOINT.stem
CHECKPOINT_SUFFIX = ".safetensors"
MAX_HEADER_BYTES = 64 * 1024 * 1024  # a safetensors header (tensor table + manifest) is far smaller
MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True)
class ModelEntry:
    """One checkpoint file and its manifest."""

    name: str
    path: Path
    manifest: dict[str, Any]
    source: str  # "packaged" | "models_dir"

    def describe(self, default_name: str) -> dict[str, Any]:
        """What ``GET /models`` shows: what a LIMS needs to choose a model and read its output."""
        m = self.manifest
        return {
            "name": self.name,
            "default": self.name == default_name,
            "source": self.source,
            "manifest_name": m.get("name"),
            "architecture": m.get("architecture"),
            "classes": [{"name": c.get("name"), "color": c.get("color")} for c in m.get("classes", [])],
            "mpp": m.get("mpp"),
            "tile_size_px": m.get("tile_size_px"),
            "output_stride": m.get("output_stride"),
            "metrics": m.get("metrics", {}),
            "domain": m.get("domain"),
            "size_bytes": self.path.stat().st_size,
        }


def read_manifest(path: Path) -> dict[str, Any]:
    """The fprotoseg manifest in a safetensors header, without reading any tensor."""
    try:
        with path.open("rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise CheckpointError(f"{path.name} is not a safetensors file (too short)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if not 2 <= header_len <= MAX_HEADER_BYTES:
                raise CheckpointError(f"{path.name} is not a safetensors file (header length {header_len})")
            header = json.loads(fh.read(header_len))
        manifest = json.loads(header["__metadata__"][MANIFEST_KEY])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path.name} is not a fprotoseg checkpoint ({type(exc).__name__})") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{path.name}: the manifest is not a JSON object")
    return manifest


def list_models(models_dir: Path | None = None) -> dict[str, ModelEntry]:
    """Name -> entry, packaged first, ``models_dir`` replacing a packaged name; unreadable files and
    names a URL cannot carry are left out (a stray file must not take the listing down)."""
    found: dict[str, ModelEntry] = {}
    sources = [(PACKAGED_WEIGHTS_DIR, "packaged")] + ([(models_dir, "models_dir")] if models_dir else [])
    for folder, source in sources:
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob(f"*{CHECKPOINT_SUFFIX}")):
            if not MODEL_NAME_RE.match(path.stem) or not path.is_file():
                continue
            try:
                manifest = read_manifest(path)
            except CheckpointError:
                continue
            found[path.stem] = ModelEntry(path.stem, path, manifest, source)
    return found


def default_model_name(checkpoint_setting: Path | str | None) -> str:
    """The configured default (FPROTOSEG_CHECKPOINT: a name or a path) as a name."""
    if checkpoint_setting is None or str(checkpoint_setting) == "":
        return DEFAULT_MODEL_NAME
    text = str(checkpoint_setting)
    return Path(text).stem if text.endswith(CHECKPOINT_SUFFIX) else text


def resolve_model(name: str, models_dir: Path | None = None) -> ModelEntry:
    """The entry called ``name``; UnknownModelError (listing the known names) otherwise."""
    models = list_models(models_dir)
    entry = models.get(name) if MODEL_NAME_RE.match(name or "") else None
    if entry is None:
        known = sorted(models)
        raise UnknownModelError(
            f"unknown model {name[:100]!r}; known models: {', '.join(known) or '(none)'}", known
        )
    return entry


def resolve_checkpoint(name_or_path: Path | str | None, models_dir: Path | None = None) -> Path:
    """A checkpoint file from a model name or a path (the CLI's --checkpoint, FPROTOSEG_CHECKPOINT):
    an existing file wins, then a known name; ``None`` is the packaged default."""
    if name_or_path is None or str(name_or_path) == "":
        return DEFAULT_CHECKPOINT
    path = Path(name_or_path)
    if path.is_file():
        return path
    text = str(name_or_path)
    if "/" in text or text.endswith(CHECKPOINT_SUFFIX):
        raise CheckpointError(f"checkpoint not found: {text}")
    return resolve_model(text, models_dir).path


def installed_models(
    checkpoint_setting: Path | str | None, models_dir: Path | None = None
) -> tuple[dict[str, ModelEntry], str]:
    """(name -> entry, the default name): the catalogue plus the configured default checkpoint when
    FPROTOSEG_CHECKPOINT names a file outside it (it is then listed under its stem)."""
    models = list_models(models_dir)
    default = default_model_name(checkpoint_setting)
    if checkpoint_setting is not None and str(checkpoint_setting) and Path(checkpoint_setting).is_file():
        path = Path(checkpoint_setting)
        existing = models.get(path.stem)
        if existing is None or existing.path.resolve() != path.resolve():
            with contextlib.suppress(CheckpointError):  # a broken default fails at load, with its reason
                models[path.stem] = ModelEntry(path.stem, path, read_manifest(path), "configured")
    return models, default
