"""Pseudo masks from stage-1 CAMs (TPRO/PBIP recipe), the training targets of stage 2.

ReLU -> per-channel min-max -> times the image-level labels -> level fusion -> flip TTA average;
background = (1 - max over classes)^k; argmax. Pixels that win as background become ``ignore``
for stage 2 (our tissue classes have no background channel: glass is the tissue mask's job).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from fprotoseg.model.fprotoseg import FProtoSegStage1, normalise_cam

IGNORE_INDEX = 255


@torch.no_grad()
def fused_normalised_cams(
    net: FProtoSegStage1, x: torch.Tensor, fusion: list[float], flip_tta: bool = True
) -> torch.Tensor:
    """(N, K, H, W) fused, per-level min-max normalised CAMs at input resolution (no gating)."""
    size = x.shape[-2:]

    def one(inp: torch.Tensor) -> torch.Tensor:
        cams = net(inp)["cams"]
        out = None
        for cam, w in zip(cams, fusion, strict=True):
            if w == 0:
                continue
            c = normalise_cam(F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)) * w
            out = c if out is None else out + c
        assert out is not None, "all fusion weights are zero"
        return out

    cams = one(x)
    if flip_tta:
        cams = 0.5 * (cams + one(x.flip(-1)).flip(-1))
    return cams


def pseudo_masks(cams: torch.Tensor, labels: torch.Tensor, bg_power: float = 10.0) -> torch.Tensor:
    """(N, H, W) int64 labels in 0..K-1, IGNORE_INDEX where background wins."""
    gated = cams * labels[:, :, None, None]
    bg = (1.0 - gated.max(dim=1, keepdim=True).values).clamp(min=0.0) ** bg_power
    full = torch.cat([gated, bg], dim=1)
    mask = full.argmax(dim=1)
    mask[mask == cams.shape[1]] = IGNORE_INDEX
    return mask


def make_pseudo_masks(
    net: FProtoSegStage1, x: torch.Tensor, labels: torch.Tensor, cfg: dict[str, Any]
) -> torch.Tensor:
    was_training = net.training
    net.eval()
    cams = fused_normalised_cams(
        net, x, [float(w) for w in cfg.get("fusion", [0.0, 0.3, 0.3, 0.4])], bool(cfg.get("flip_tta", True))
    )
    net.train(was_training)
    return pseudo_masks(cams, labels, float(cfg.get("bg_power", 10.0)))


@torch.no_grad()
def pseudo_label_map(
    net: FProtoSegStage1, x: torch.Tensor, label: torch.Tensor, fusion: list[float]
) -> torch.Tensor:
    """(H, W) class indices of one whole image's pseudo mask, gated by its true image label.

    The standard intermediate figure of weakly supervised segmentation: how good the stage-1
    network's CAMs are as training targets, scored against the expert mask on validation images
    (ignore pixels excluded by the metric, so no background threshold enters).
    """
    was_training = net.training
    net.eval()
    h, w = x.shape[-2:]
    pad_h, pad_w = -h % 32, -w % 32  # every encoder level divides the padded size
    padded = F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if (pad_h or pad_w) else x
    cams = fused_normalised_cams(net, padded, fusion, flip_tta=True)[..., :h, :w]
    net.train(was_training)
    gated = cams[0] * (label > 0).to(cams.dtype)[:, None, None]
    return gated.argmax(dim=0)
