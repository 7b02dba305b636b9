"""Evaluate a checkpoint on image+mask pairs: the same ``predict`` the whole-slide worker calls.

Each crop is cut into tiles of the checkpoint's tile size (symmetric padding at the border),
exactly as the whole-slide worker tiles a slide; scores are upsampled to full resolution, argmax
over the tissue classes, and pixels whose ground truth is ignore/background are handled by the
chosen metric protocol. Baselines (best constant, colour threshold) go through the same metric
code so the model card compares like with like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.model.stain_norm import normalise_image
from fprotoseg.model.training.datasets import DATASETS, DatasetError, MaskedImage, load_pairs
from fprotoseg.model.training.metrics import (
    PROTOCOL_SOURCES,
    confusion_matrix,
    evaluate_protocol,
    resolve_protocol,
)

PredictFn = Callable[[np.ndarray], np.ndarray]  # uint8 (1, H, W, 3) -> (1, K, h, w) scores


def _upsample_scores(scores: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of (K, h, w) scores to (K, H, W) (torch: same kernel as training)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(scores))[None].float()
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0].numpy()


GLASS_RGB = 244  # the white of empty glass in a scan (also what mosaic slides are laid on)
CONTEXTS = ("reflect", "glass")


def predict_scores(
    predict: PredictFn, rgb: np.ndarray, tile_px: int, context: str = "reflect", offset_px: int = 48
) -> np.ndarray:
    """(K, H, W) float32 class scores for one RGB crop of any size, tiled exactly as the service tiles.

    Non-overlapping ``tile_px`` tiles (the checkpoint's tile size) over the crop; scores upsampled
    bilinearly to pixels. Running the whole crop at once would show the network a context size it
    never sees in a slide. ``context`` says what fills a tile beyond the crop: ``reflect`` mirrors
    the crop (the crop-level protocol of the literature); ``glass`` lays the crop on empty glass
    ``offset_px`` from the tile corner, as a biopsy edge or a mosaic slide looks to the whole-slide
    worker. A network that only holds up under ``reflect`` fails on slides.
    """
    if context not in CONTEXTS:
        raise ValueError(f"context must be one of {CONTEXTS}, got {context!r}")
    h, w = rgb.shape[:2]
    off = offset_px if context == "glass" else 0
    ph, pw = -(h + off) % tile_px, -(w + off) % tile_px
    if context == "glass":
        padded = np.full((h + off + ph, w + off + pw, 3), GLASS_RGB, np.uint8)
        padded[off : off + h, off : off + w] = rgb
    else:
        padded = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="symmetric") if (ph or pw) else rgb
    out: np.ndarray | None = None
    tiles, origins = [], []
    for y in range(0, padded.shape[0], tile_px):
        for x in range(0, padded.shape[1], tile_px):
            tiles.append(padded[y : y + tile_px, x : x + tile_px])
            origins.append((y, x))
    for start in range(0, len(tiles), 32):
        scores = predict(np.stack(tiles[start : start + 32]))
        if out is None:
            out = np.zeros((scores.shape[1], *padded.shape[:2]), dtype=np.float32)
        for (y, x), s in zip(origins[start : start + 32], scores, strict=True):
            out[:, y : y + tile_px, x : x + tile_px] = _upsample_scores(s, tile_px, tile_px)
    assert out is not None
    return out[:, off : off + h, off : off + w]


def predict_labels(
    predict: PredictFn, rgb: np.ndarray, tile_px: int, context: str = "reflect", offset_px: int = 48
) -> np.ndarray:
    """(H, W) argmax labels of :func:`predict_scores` (the same tiling and context)."""
    return predict_scores(predict, rgb, tile_px, context, offset_px).argmax(0).astype(np.int64)


def confusion_over(
    pairs: Sequence[MaskedImage],
    label_fn: Callable[[MaskedImage], np.ndarray],
    num_labels: int,
    ignore: Sequence[int],
) -> np.ndarray:
    cm = np.zeros((num_labels, num_labels), dtype=np.int64)
    for p in pairs:
        cm += confusion_matrix(p.mask, label_fn(p), num_labels, ignore)
    return cm


def score_pairs(
    pairs: Sequence[MaskedImage],
    label_fn: Callable[[MaskedImage], np.ndarray],
    dataset: str,
    protocol: str = "ignore_background",
) -> dict[str, Any]:
    """Metrics for a labelling function over pairs under a protocol of the dataset.

    ``label_fn`` returns tissue classes 0..K-1 and, for a network with a background class, K for
    background (the mask value of LUAD-HistoSeg/BCSS-WSSS background; WSSS4LUAD's 3). The matrix
    is (K+1) x (K+1); for a dataset without background in its masks (WSSS4LUAD) it stays K x K
    unless the labels use background, and the protocol is the challenge's (background excluded).
    ``protocol``: a name of :data:`fprotoseg.model.training.metrics.PROTOCOLS`, an alias, or ``paper``.
    """
    spec = DATASETS[dataset]
    k = len(spec.classes)
    name = resolve_protocol(protocol, dataset)
    background = spec.background_index if spec.background_index is not None else k
    cm = confusion_over(pairs, label_fn, k + 1, [spec.ignore_index])
    if spec.background_index is None:
        name = "background_excluded"  # the masks have no background to score
        if not cm[:, k].any():
            cm = cm[:k, :k]  # a K-class labelling: the K x K matrix of before
    result = evaluate_protocol(cm, spec.classes, name, background)
    result["confusion_matrix"] = cm.tolist()
    result["protocol"] = name
    result["protocol_source"] = PROTOCOL_SOURCES[name]
    result["images"] = len(pairs)
    return result


def best_constant(pairs: Sequence[MaskedImage], dataset: str) -> dict[str, Any]:
    """The best single-class prediction over the pairs (the floor any model must beat)."""
    spec = DATASETS[dataset]
    best: dict[str, Any] | None = None
    for c in range(len(spec.classes)):
        def constant(p: MaskedImage, c: int = c) -> np.ndarray:
            return np.full(p.mask.shape, c)

        r = score_pairs(pairs, constant, dataset)
        if best is None or r["miou"] > best["miou"]:
            best = {**r, "constant": spec.classes[c]}
    assert best is not None
    return best


def colour_threshold_labels(rgb: np.ndarray) -> np.ndarray:
    """A training-free WSSS4LUAD baseline from H&E colour alone (wsss4luad class order).

    Dark haematoxylin-rich pixels -> tumour (crowded nuclei), pink eosin -> stroma, pale
    -> normal (air spaces of alveoli). Thresholds are fixed, chosen by stain chemistry, not fitted.
    """
    f = rgb.astype(np.float32) / 255.0
    r, g, b = f[..., 0], f[..., 1], f[..., 2]
    brightness = f.mean(-1)
    out = np.full(rgb.shape[:2], 1, dtype=np.int64)  # stroma by default
    out[(b - r > -0.05) & (brightness < 0.62)] = 0  # bluish-purple and dark: nuclei-rich tumour
    out[brightness > 0.82] = 2  # pale: open alveolar spaces of normal lung
    del g
    return out


def evaluate_checkpoint(
    checkpoint: str | Path | None,
    data_root: str | Path,
    dataset: str = "wsss4luad",
    names: Sequence[str] | None = None,
    protocol: str = "ignore_background",
    device: str = "cpu",
    precision: str = "fp32",
    context: str = "reflect",
) -> dict[str, Any]:
    """Load a checkpoint through the worker's seam and score it on ``data_root`` pairs
    (``context``: what surrounds each crop in its tiles, see :func:`predict_labels`)."""
    from fprotoseg.model import load_segmenter

    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    seg = load_segmenter(checkpoint, device=device, precision=precision)
    pairs = load_pairs(Path(data_root), names)
    spec = DATASETS[dataset]
    # a stage-2 network with a background class (``stage2.background``) lists it last
    tissue = [c for c in getattr(seg, "manifest", {}).get("classes", []) if not c.get("background")]
    n_tissue = len(tissue) if tissue else len(seg.classes)
    if n_tissue != len(spec.classes):
        raise DatasetError(
            f"checkpoint has {n_tissue} classes but {dataset} has {len(spec.classes)}; "
            "pick the matching --dataset"
        )
    manifest = getattr(seg, "manifest", {})

    def label_fn(p: MaskedImage) -> np.ndarray:  # each image restained from its own estimate, if asked
        return predict_labels(seg.predict, normalise_image(manifest, p.rgb), seg.tile_size_px, context)

    result = score_pairs(pairs, label_fn, dataset, protocol)
    result["context"] = context
    result["checkpoint"] = seg.name
    result["checkpoint_sha256"] = seg.checksum_sha256
    result["dataset"] = dataset
    return result


def heldout_names(checkpoint: str | Path | None) -> list[str]:
    """The held-out image names recorded in a checkpoint's training config."""
    from fprotoseg.model import DEFAULT_CHECKPOINT
    from fprotoseg.model.checkpoint import read_checkpoint

    _, manifest = read_checkpoint(Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT)
    names = manifest.get("config", {}).get("data", {}).get("holdout")
    if not names:
        raise DatasetError("this checkpoint records no held-out split; pass --names a.png,b.png")
    return list(names)
