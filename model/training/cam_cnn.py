"""A small CAM network trained from scratch on crop-level labels: the baseline every recipe must beat.

Why it exists: on tissue this repository never sees, four blocks of plain convolutions trained from
image-level labels (global average pooling, BCE, argmax of the class activation map at stride 8)
scored 0.58-0.66 mIoU where the ImageNet-initialised prototype network scored 0.52. It is local by
construction — its receptive field is 75 px and it has no tile-level gate — so no class border can
follow a tile edge, and it is cheap enough (about 0.6 GFLOP per 112 px crop) to train every fold
of a cross-validation on two CPU cores. A recipe is a :class:`CamCnnRecipe`; every field has one
default, here, and the YAML files in model/configs only state what they change.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from fprotoseg.model.networks.cam_cnn import ARCHITECTURE, NORMALISATION, CamCnn
from fprotoseg.model.stain_norm import METHOD as STAIN_METHOD
from fprotoseg.model.stain_norm import StainEstimate, StainNormaliser
from fprotoseg.model.training.compression import jpeg_roundtrip
from fprotoseg.model.training.datasets import DatasetError, image_level_label, put_glass
from fprotoseg.model.training.stain import hed_jitter

WSSS4LUAD_CLASSES: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("Tumor", (200, 0, 0)),
    ("Stroma", (150, 200, 150)),
    ("Normal", (0, 120, 255)),
)


@dataclass(frozen=True)
class CamCnnRecipe:
    """Everything that decides a trained file, with its one default."""

    name: str = "cam-cnn-baseline"
    channels: tuple[int, ...] = (32, 64, 128, 256)
    strides: tuple[int, ...] = (2, 2, 2, 1)
    crop_px: int = 112
    label_fraction: float = 0.05  # a class is in a crop's label above this share of its pixels
    batch: int = 32
    steps: int = 1200
    lr: float = 1e-3
    weight_decay: float = 1e-3
    hed_sigma: float = 0.0  # H&E stain jitter per crop (model/training/stain.py:hed_jitter); 0 = none
    cosine: bool = False  # cosine learning-rate decay to 0 over ``steps``
    # Share of crops with a band of empty glass in place of tissue (model/training/datasets.py:put_glass):
    # on a slide the network meets glass beside tissue at every tissue edge, never in a crop.
    glass_prob: float = 0.0
    # Share of crops sent through a JPEG round trip at a quality in ``jpeg_quality``, after the stain
    # jitter (model/training/compression.py): slides are JPEG tiles, the labelled crops lossless.
    jpeg_prob: float = 0.0
    jpeg_quality: tuple[int, int] = (60, 95)
    # "macenko": every crop restained to the training crops' median stain (model/stain_norm.py), the
    # reference kept in the manifest so inference restains each slide the same way; "" = none
    stain_norm: str = ""
    mpp: float = 1.0
    # 512 px tiles: the default 1/8 overlap (64 px) then exceeds half the receptive field plus one
    # output cell (45 px), so every owned pixel is scored exactly as in one pass over the slide.
    tile_size_px: int = 512
    # Stage 2 (self-training): after ``steps``, the network labels its own training images with the
    # shipped inference (4 views, guided refinement, classes outside the image's label removed),
    # then trains ``stage2_steps`` more on those pixel targets plus the image-level loss; 0 = none.
    stage2_steps: int = 0
    stage2_lr: float = 3e-4
    stage2_min_confidence: float = 0.5  # pseudo-mask pixels below this refined probability are ignored

    @property
    def output_stride(self) -> int:
        return int(np.prod(self.strides))

    @property
    def receptive_field_px(self) -> int:
        """Input pixels one CAM cell sees (75 for the baseline): what a tile overlap must cover."""
        field, jump = 1, 1
        for stride in self.strides:
            field += 2 * jump  # the block's strided 3x3 conv
            jump *= stride
            field += 2 * jump  # its second 3x3 conv
        return field

    @classmethod
    def from_yaml(cls, path: str | Path) -> CamCnnRecipe:
        """Read a recipe file; unknown keys are refused (a typo must not train a default)."""
        raw = yaml.safe_load(Path(path).read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise DatasetError(f"{Path(path).name}: unknown recipe keys {', '.join(unknown)}")
        for key in ("channels", "strides", "jpeg_quality"):
            if key in raw:
                raw[key] = tuple(int(v) for v in raw[key])
        if raw.get("stain_norm", "") not in ("", STAIN_METHOD):
            raise DatasetError(f"{Path(path).name}: stain_norm must be '' or {STAIN_METHOD!r}")
        return replace(cls(), **raw)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"], out["strides"] = list(self.channels), list(self.strides)
        out["jpeg_quality"] = list(self.jpeg_quality)
        return out


def _dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 rotations/flips (k in 0..7) of an (H, W, ...) array."""
    out = np.rot90(img, k % 4)
    return out[:, ::-1] if k >= 4 else out


@dataclass(frozen=True)
class TrainImage:
    """One training image: a pixel mask (crops take their label from the pixels they hold) or
    only an image-level ``label`` (a patch small enough that every crop of it keeps that label,
    as BCSS-WSSS ships its training slides)."""

    rgb: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None = None  # (H, W) int64 class indices
    label: np.ndarray | None = None  # (K,) 0/1

    def __post_init__(self) -> None:
        if (self.mask is None) == (self.label is None):
            raise DatasetError("a training image has either a mask or an image-level label")


class CropSampler:
    """Random crops of labelled images with the labels of their own pixels (the only thing a
    crop takes from a mask), drawn in proportion to image area."""

    def __init__(self, images: Sequence[TrainImage], recipe: CamCnnRecipe, num_classes: int) -> None:
        if not images:
            raise DatasetError("no training images")
        self.images = list(images)
        self.recipe = recipe
        self.num_classes = num_classes
        areas = np.array([im.rgb.shape[0] * im.rgb.shape[1] for im in self.images], dtype=np.float64)
        self.p = areas / areas.sum()

    def batch(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """``recipe.batch`` crops (NHWC uint8) and their image-level labels (N, K)."""
        crops, labels, _ = self._draw(rng, None)
        return crops, labels

    def pixel_batch(
        self, rng: np.random.Generator, targets: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :meth:`batch`, plus the same crop of each image's pixel target (N, H, W) int64, one
        per image in ``targets``; glass and padding take the ignore index ``num_classes``."""
        crops, labels, pixels = self._draw(rng, targets)
        assert pixels is not None
        return crops, labels, pixels

    def _draw(
        self, rng: np.random.Generator, targets: Sequence[np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        r, k = self.recipe, self.num_classes
        crops = np.empty((r.batch, r.crop_px, r.crop_px, 3), np.uint8)
        labels = np.empty((r.batch, k), np.float32)
        pixels = None if targets is None else np.empty((r.batch, r.crop_px, r.crop_px), np.int64)
        for i in range(r.batch):
            index = int(rng.choice(len(self.images), p=self.p))
            im = self.images[index]
            h, w = im.rgb.shape[:2]
            y = int(rng.integers(0, max(1, h - r.crop_px + 1)))
            x = int(rng.integers(0, max(1, w - r.crop_px + 1)))
            c_rgb = im.rgb[y : y + r.crop_px, x : x + r.crop_px]
            c_pix = None if targets is None else targets[index][y : y + r.crop_px, x : x + r.crop_px]
            if im.mask is None:  # image-level label only: the crop keeps it (no glass, which would
                labels[i] = im.label  # need the pixels' classes to relabel what stays visible)
            else:
                c_mask = im.mask[y : y + r.crop_px, x : x + r.crop_px]
                if r.glass_prob > 0 and rng.random() < r.glass_prob:
                    if c_pix is None:
                        c_rgb, c_mask = put_glass(rng, c_rgb, c_mask, k)
                    else:  # one cover for the mask and the target: glass becomes ignore in both
                        c_rgb, both = put_glass(rng, c_rgb, np.stack([c_mask, c_pix], axis=-1), k)
                        c_mask, c_pix = both[..., 0], both[..., 1]
                labels[i] = image_level_label(c_mask, k, r.label_fraction)
            ph, pw = r.crop_px - c_rgb.shape[0], r.crop_px - c_rgb.shape[1]
            if ph or pw:
                c_rgb = np.pad(c_rgb, ((0, ph), (0, pw), (0, 0)), mode="reflect")
                if c_pix is not None:
                    c_pix = np.pad(c_pix, ((0, ph), (0, pw)), constant_values=k)
            view = int(rng.integers(8))
            crops[i] = _dihedral(c_rgb, view)
            if pixels is not None and c_pix is not None:
                pixels[i] = _dihedral(c_pix, view)
        if r.hed_sigma > 0:
            crops = hed_jitter(crops, rng, r.hed_sigma)
        crops = jpeg_roundtrip(crops, rng, r.jpeg_prob, r.jpeg_quality)
        return crops, labels, pixels


def restain(images: Sequence[TrainImage], recipe: CamCnnRecipe) -> tuple[list[TrainImage], dict[str, Any]]:
    """The training images as the network will see them, and what the manifest must carry.

    With ``stain_norm``, each image is restained from its own stain estimate to the median of all
    of them (an image with too little stained tissue to estimate from is left as it is); the
    reference goes into the manifest as ``stain_norm`` so inference restains a slide to the same
    stain. Without it, the images and an empty manifest addition.
    """
    if not recipe.stain_norm:
        return list(images), {}
    estimates = [StainEstimate.of_image(im.rgb) for im in images]
    known = [e for e in estimates if e is not None]
    if not known:
        raise DatasetError("stain_norm: no training image has enough stained tissue to estimate from")
    reference = StainEstimate.reference(known)
    out = [
        replace(im, rgb=StainNormaliser(e, reference)(im.rgb)) if e is not None else im
        for im, e in zip(images, estimates, strict=True)
    ]
    return out, {"stain_norm": reference.as_json()}


def to_input(crops_nhwc_uint8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalised NCHW float, as TorchSegmenter does at inference."""
    x = torch.from_numpy(np.ascontiguousarray(crops_nhwc_uint8)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(NORMALISATION["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(NORMALISATION["std"]).view(1, 3, 1, 1)
    return (x - mean) / std


def train(
    images: Sequence[TrainImage],
    recipe: CamCnnRecipe,
    seed: int,
    num_classes: int = 3,
    progress: Callable[[int, float], None] | None = None,
    after_stage1: Callable[[CamCnn], None] | None = None,
) -> CamCnn:
    """Train one network; masks only ever give crop-level labels. With stage 2, ``after_stage1``
    sees the network as stage 1 leaves it (CV keeps it to score both stages of one run, paired)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = CamCnn(num_classes, recipe.channels, recipe.strides)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sampler = CropSampler(images, recipe, num_classes)
    net.train()
    for step in range(recipe.steps):
        crops, labels = sampler.batch(rng)
        logits = net.cam(to_input(crops)).mean(dim=(2, 3))  # global average pooling of the CAM
        loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if recipe.cosine:
            for group in opt.param_groups:
                group["lr"] = recipe.lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / recipe.steps))
        if progress is not None:
            progress(step + 1, float(loss.detach()))
    if recipe.stage2_steps > 0:
        if after_stage1 is not None:
            after_stage1(net.eval())
        targets = pseudo_masks(net, images, recipe, num_classes)
        _self_train(net, sampler, targets, recipe, rng, num_classes, progress)
    return net.eval()


# What labels the training images for stage 2: the shipped default's inference (model/weights).
PSEUDO_INFERENCE: dict[str, Any] = {
    "dihedral_views": 4,
    "guided_refine": {"output_stride": 8, "radius_cells": 8, "eps": 0.001},
}
PSEUDO_TILE_PX = 1024
# A pixel this bright in every channel is glass or an empty lumen: stage 2 gives it no class.
PSEUDO_WHITE_MIN = 215


def pseudo_masks(
    net: CamCnn, images: Sequence[TrainImage], recipe: CamCnnRecipe, num_classes: int
) -> list[np.ndarray]:
    """Per training image, (H, W) int64 pixel targets from ``net`` itself, ignore = ``num_classes``.

    Why: the network's CAM is trained only to say which classes a crop holds; its borders are
    blobs. The refined map of the whole image (4 views, guided filter on the image's colours) is
    finer, and restricted to the image's own label it cannot name a class the image lacks. Training
    on it teaches the cells where borders fall. Uncertain pixels (refined probability below
    ``stage2_min_confidence``) and near-white pixels are ignored. Only image-level information is
    used: the label of the whole image, which its mask gives as it gives every crop's.
    """
    from fprotoseg.model.inference_options import apply_inference_options
    from fprotoseg.model.training.evaluate import predict_scores

    manifest = {
        "classes": [{"name": str(i)} for i in range(num_classes)],
        "output_stride": recipe.output_stride,
        "normalisation": NORMALISATION,
        "inference": PSEUDO_INFERENCE,
    }
    module = apply_inference_options(net.eval(), manifest)

    def predict(tiles: np.ndarray) -> np.ndarray:
        return module(to_input(tiles)).float().numpy()

    out = []
    with torch.inference_mode():
        for im in images:
            if im.mask is None:
                label = im.label
            else:
                label = image_level_label(im.mask, num_classes, recipe.label_fraction)
            assert label is not None
            probs = predict_scores(predict, im.rgb, PSEUDO_TILE_PX) * label.reshape(-1, 1, 1)
            total = probs.sum(axis=0)
            target = probs.argmax(axis=0).astype(np.int64)
            confident = probs.max(axis=0) >= recipe.stage2_min_confidence * np.maximum(total, 1e-12)
            white = im.rgb.min(axis=2) >= PSEUDO_WHITE_MIN
            target[~confident | white | (total <= 0)] = num_classes
            out.append(target)
    net.train()
    return out


def _self_train(
    net: CamCnn,
    sampler: CropSampler,
    targets: Sequence[np.ndarray],
    recipe: CamCnnRecipe,
    rng: np.random.Generator,
    num_classes: int,
    progress: Callable[[int, float], None] | None,
) -> None:
    """Stage 2: the image-level loss plus pixel cross-entropy of the upsampled CAM on ``targets``."""
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.stage2_lr, weight_decay=recipe.weight_decay)
    for step in range(recipe.stage2_steps):
        crops, labels, pixels = sampler.pixel_batch(rng, targets)
        cam = net.cam(to_input(crops))
        loss = F.binary_cross_entropy_with_logits(cam.mean(dim=(2, 3)), torch.from_numpy(labels))
        target = torch.from_numpy(pixels)
        if bool((target != num_classes).any()):  # an all-ignore batch has no pixel loss (0/0)
            logits = F.interpolate(cam, size=target.shape[1:], mode="bilinear", align_corners=False)
            loss = loss + F.cross_entropy(logits, target, ignore_index=num_classes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for group in opt.param_groups:  # cosine decay to 0 over stage 2
            group["lr"] = recipe.stage2_lr * 0.5 * (1 + np.cos(np.pi * (step + 1) / recipe.stage2_steps))
        if progress is not None:
            progress(recipe.steps + step + 1, float(loss.detach()))


def manifest_for(
    recipe: CamCnnRecipe,
    classes: Sequence[tuple[str, tuple[int, int, int]]] = WSSS4LUAD_CLASSES,
    **extra: Any,
) -> dict[str, Any]:
    """The checkpoint manifest of a network trained with ``recipe``."""
    return {
        "name": recipe.name,
        "architecture": ARCHITECTURE,
        "config": recipe.to_dict(),
        "classes": [{"name": n, "color": list(c)} for n, c in classes],
        "mpp": recipe.mpp,
        "tile_size_px": recipe.tile_size_px,
        "output_stride": recipe.output_stride,
        "receptive_field_px": recipe.receptive_field_px,
        "normalisation": NORMALISATION,
        "created_unix": int(time.time()),
        **extra,
    }
