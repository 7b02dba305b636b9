"""Pseudo masks from stage-1 CAMs (TPRO/PBIP recipe), the training targets of stage 2.

ReLU -> per-channel min-max -> times the image-level labels -> level fusion -> TTA average (flip,
or flips and 90-degree rotations); background = (1 - max over classes)^k; argmax. Pixels that
win as background become ``ignore`` for stage 2: a weak CAM is not evidence of "not tissue".

With ``stage2.background`` the masks keep a background class of their own (index K, the mask
value of LUAD-HistoSeg/BCSS-WSSS background): bright, low-saturation pixels (glass, fat, alveolar
air), the white-background prior of the LUAD-HistoSeg/BCSS-WSSS recipes (MLPS, TPRO: grey > 200,
small specks removed; here with a saturation bound as well, and an opening for the specks).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fprotoseg.model.config_schema import PseudoMaskConfig, WhitePrior
from fprotoseg.model.networks.fprotoseg import normalise_cam

IGNORE_INDEX = 255


@torch.no_grad()
def fused_normalised_cams(
    net: nn.Module, x: torch.Tensor, fusion: list[float], flip_tta: bool = True, rot_tta: bool = False
) -> torch.Tensor:
    """(N, K, H, W) fused, per-level min-max normalised CAMs at input resolution (no gating).

    TTA averages the normalised CAMs of the transformed inputs, each mapped back: ``flip_tta`` a
    horizontal flip, ``rot_tta`` the 90/180/270-degree rotations (with ``flip_tta``: all eight
    flips and rotations). Rotations need a size every encoder level divides either way round.
    """
    def one(inp: torch.Tensor) -> torch.Tensor:
        size = inp.shape[-2:]
        cams = net(inp)["cams"]
        out = None
        for cam, w in zip(cams, fusion, strict=True):
            if w == 0:
                continue
            c = normalise_cam(F.interpolate(cam.float(), size=size, mode="bilinear", align_corners=False)) * w
            out = c if out is None else out + c
        assert out is not None, "all fusion weights are zero"
        return out

    if not rot_tta:
        cams = one(x)
        if flip_tta:
            cams = 0.5 * (cams + one(x.flip(-1)).flip(-1))
        return cams
    total = None
    n = 0
    for flip in (False, True) if flip_tta else (False,):
        base = x.flip(-1) if flip else x
        for r in range(4):
            c = torch.rot90(one(torch.rot90(base, r, dims=(-2, -1))), -r, dims=(-2, -1))
            c = c.flip(-1) if flip else c
            total = c if total is None else total + c
            n += 1
    assert total is not None
    return total / n


def white_background(rgb: torch.Tensor, prior: WhitePrior | None = None) -> torch.Tensor:
    """(N, H, W) bool: bright, low-saturation pixels of (N, 3, H, W) RGB in 0..255.

    Grey level 0.299 R + 0.587 G + 0.114 B above ``prior.grey`` (the recipes' threshold of 200)
    and saturation (max - min) / max below ``prior.max_saturation`` (pale eosin is bright but
    pink); then a morphological opening of ``prior.open_px`` removes white specks (the recipes
    remove objects under 50-80 px), so a lumen or a bright nucleus edge inside tissue stays tissue.
    ``None``: the schema's defaults (``stage2.white_prior``).
    """
    prior = prior or WhitePrior()
    grey, max_saturation, open_px = prior.grey, prior.max_saturation, prior.open_px
    rgb = rgb.float()
    level = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    hi, lo = rgb.max(dim=1).values, rgb.min(dim=1).values
    saturation = (hi - lo) / hi.clamp(min=1.0)
    white = (level > grey) & (saturation < max_saturation)
    if open_px > 1:
        h, w = white.shape[-2:]
        pad = open_px // 2
        m = white.float()[:, None]
        eroded = -F.max_pool2d(-m, open_px, stride=1, padding=pad)[..., :h, :w]
        white = F.max_pool2d(eroded, open_px, stride=1, padding=pad)[:, 0, :h, :w] > 0.5
    return white


def pseudo_masks(
    cams: torch.Tensor, labels: torch.Tensor, bg_power: float, white: torch.Tensor | None = None
) -> torch.Tensor:
    """(N, H, W) int64 labels in 0..K-1, IGNORE_INDEX where background wins; with ``white``
    ((N, H, W) bool, :func:`white_background`) those pixels are class K, background."""
    gated = cams * labels[:, :, None, None]
    bg = (1.0 - gated.max(dim=1, keepdim=True).values).clamp(min=0.0) ** bg_power
    full = torch.cat([gated, bg], dim=1)
    mask = full.argmax(dim=1)
    mask[mask == cams.shape[1]] = IGNORE_INDEX
    if white is not None:
        mask[white] = cams.shape[1]
    return mask


def make_pseudo_masks(
    net: nn.Module, x: torch.Tensor, labels: torch.Tensor, cfg: PseudoMaskConfig
) -> torch.Tensor:
    """Stage 2's targets for a batch ``x`` (the student's input tensors) from the teacher ``net``.

    ``cfg`` is how the masks are made (the ``stage2`` section in training). With ``background``
    the teacher must be a :class:`fprotoseg.model.training.stage2.TeacherView` (it knows how to turn ``x``
    back into RGB for the white prior).
    """
    was_training = net.training
    net.eval()
    cams = fused_normalised_cams(net, x, cfg.fusion, cfg.flip_tta, cfg.rot_tta)
    net.train(was_training)
    white = None
    if cfg.background:
        rgb = getattr(net, "rgb", None)
        if rgb is None:
            raise ValueError("stage2.background needs the teacher wrapped in stage2.TeacherView")
        white = white_background(rgb(x), cfg.white_prior)
    return pseudo_masks(cams, labels, cfg.bg_power, white)


@torch.no_grad()
def pseudo_label_map(
    net: nn.Module, x: torch.Tensor, label: torch.Tensor, fusion: list[float]
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
