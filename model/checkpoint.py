"""Checkpoints: one ``.safetensors`` file, tensors plus a JSON manifest in its metadata.

Never pickle: a checkpoint from a user is untrusted input, and safetensors holds only raw tensors.
The manifest (metadata key ``fprotoseg_manifest``) carries everything needed to rebuild and use
the network: architecture and config, classes and colours, mpp, tile size, output stride,
normalisation, text prompts/embeddings, training data description and metrics.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fprotoseg.model.errors import CheckpointError

# The packaged default model (package data; the API image ships without it).
DEFAULT_CHECKPOINT = Path(__file__).parent / "weights" / "fprotoseg_wsss4luad.safetensors"
MANIFEST_KEY = "fprotoseg_manifest"
FORMAT_VERSION = 1
REQUIRED_KEYS = ("architecture", "config", "classes", "mpp", "tile_size_px", "output_stride")


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Refuse manifests that would fail later in confusing ways."""
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise CheckpointError(f"checkpoint manifest lacks {', '.join(missing)}")
    classes = manifest["classes"]
    if not isinstance(classes, list) or not classes:
        raise CheckpointError("checkpoint manifest has no classes")
    for c in classes:
        color = c.get("color") if isinstance(c, dict) else None
        color_ok = isinstance(color, list) and len(color) == 3
        color_ok = color_ok and all(isinstance(v, int) and 0 <= v <= 255 for v in color or ())
        if not isinstance(c, dict) or not c.get("name") or not color_ok:
            raise CheckpointError(f"checkpoint class entry {c!r} needs a name and an [r, g, b] color")
    if not float(manifest["mpp"]) > 0:
        raise CheckpointError("checkpoint mpp must be positive")
    if manifest.get("stain_norm"):
        # refused here, at load, not on a slide's first tile after QC and reading have run
        from fprotoseg.model.stain_norm import StainEstimate

        try:
            StainEstimate.from_json(manifest["stain_norm"])
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint stain_norm is unusable: {exc!r}") from None


def save_checkpoint(path: str | Path, state_dict: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """Write tensors + manifest atomically (tmp file then rename)."""
    from safetensors.torch import save_file

    validate_manifest(manifest)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    meta = {MANIFEST_KEY: json.dumps({"format_version": FORMAT_VERSION, **manifest})}
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return (state_dict, manifest); any unreadable or foreign file -> CheckpointError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as exc:  # safetensors raises several types for corrupt headers
        raise CheckpointError(f"{path.name} is not a readable .safetensors checkpoint ({exc})") from None
    raw = meta.get(MANIFEST_KEY)
    if raw is None:
        raise CheckpointError(
            f"{path.name} is a safetensors file but not a fprotoseg checkpoint (no manifest)"
        )
    try:
        manifest = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path.name}: manifest is not valid JSON ({exc})") from None
    validate_manifest(manifest)
    return state, manifest
