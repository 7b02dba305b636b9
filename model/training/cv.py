"""Cross-validation units, fixed folds and their scores: the only place a recipe is chosen.

Why a module of its own: a recipe chosen on the split that scores it reports a figure no lab will
see (a 19-crop split once said 0.715 where unseen tissue said 0.518). Every choice — recipe, gate,
schedule, ablation — is made on the out-of-fold predictions of fixed folds written in a config
(``model/recipes/cv_*.yaml``), and reported as mean ± sd over folds and seeds beside the pooled
figure (all out-of-fold pixels in one confusion matrix, which counts a rare class such as Normal
over every image that holds it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from fprotoseg.model.training.cam_cnn import TrainImage
from fprotoseg.model.training.datasets import (
    DATASETS,
    DatasetError,
    find_dir,
    list_images,
    load_pairs,
    parse_filename_label,
    read_rgb,
)
from fprotoseg.model.training.metrics import confusion_matrix

CONFIG_DIR = Path(__file__).parents[1] / "recipes"  # CV plans and CAM-CNN recipes, not training configs
SPLIT_MARK = "#"  # "68.png#2": the third band of 68.png named in the config's ``splits``


@dataclass
class CvUnit:
    """One image (or one band of a large image) that belongs to exactly one fold: with a pixel mask,
    or with only an image-level label (BCSS-WSSS training patches)."""

    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray | None  # (H, W) int64 class indices (the dataset's ignore index outside tissue)
    fold: int
    label: np.ndarray | None = None  # (K,) 0/1 where there is no mask

    def train_image(self) -> TrainImage:
        """What training may take from this unit (the mask only ever gives crop-level labels)."""
        return TrainImage(self.rgb, self.mask, None if self.mask is not None else self.label)


@dataclass(frozen=True)
class CvPlan:
    """A fixed fold plan read from a config: dataset, data root and the units of each fold."""

    dataset: str
    data_root: Path
    folds: tuple[tuple[str, ...], ...]
    splits: dict[str, tuple[tuple[int, int], ...]]
    # Folds named by slide: every image whose file name starts with a fold's prefix belongs to it
    # (leave-one-slide-out), found in the data root's training folder (image-level labels in the
    # file name) and its img/mask folders.
    by_prefix: bool = False
    source_mpp: float = 1.0  # µm/px of the files
    mpp: float = 1.0  # µm/px the recipes train and predict at (files are resampled to it)
    min_label_fraction: float = 0.02  # a unit "holds" a class above this share of its pixels

    @property
    def num_folds(self) -> int:
        return len(self.folds)


def read_plan(config: str | Path, shared_data: str | Path) -> CvPlan:
    """The fold plan of ``config`` (a path or a name in model/recipes), data under ``shared_data``."""
    path = Path(config)
    if not path.is_file():
        path = CONFIG_DIR / (str(config) if str(config).endswith(".yaml") else f"{config}.yaml")
    if not path.is_file():
        raise DatasetError(f"cross-validation config not found: {config}")
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    folds = tuple(tuple(str(n) for n in fold) for fold in raw["folds"])
    names = [n for fold in folds for n in fold]
    if len(names) != len(set(names)):
        raise DatasetError(f"{path.name}: a unit is listed in two folds")
    splits = {str(k): tuple((int(a), int(b)) for a, b in v) for k, v in (raw.get("splits") or {}).items()}
    source_mpp = float(raw.get("source_mpp", 1.0))
    return CvPlan(
        str(raw["dataset"]),
        Path(shared_data) / str(raw["data_root"]),
        folds,
        splits,
        by_prefix=bool(raw.get("by_prefix", False)),
        source_mpp=source_mpp,
        mpp=float(raw.get("mpp", source_mpp)),
        min_label_fraction=float(raw.get("min_label_fraction", 0.02)),
    )


def _resample(
    rgb: np.ndarray, mask: np.ndarray | None, factor: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """Image (area-averaged) and mask (nearest) scaled by ``factor`` (0.5: half the pixels per side)."""
    if factor == 1.0:
        return rgb, mask
    size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
    out_rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BOX))
    if mask is None:
        return out_rgb, None
    nearest = Image.fromarray(mask.astype(np.int32)).resize(size, Image.Resampling.NEAREST)
    out_mask = np.asarray(nearest).astype(np.int64)
    return out_rgb, out_mask


def _load_by_prefix(plan: CvPlan) -> list[CvUnit]:
    """Every image of the data root (training patches with labels in their names, img/mask pairs)
    in the fold of the slide prefix it starts with; images of no listed slide are refused."""
    k = len(DATASETS[plan.dataset].classes)
    factor = plan.source_mpp / plan.mpp

    def fold_of(name: str) -> int:
        for i, fold in enumerate(plan.folds):
            if any(name.startswith(prefix) for prefix in fold):
                return i
        raise DatasetError(f"{name}: belongs to no slide of the fold plan")

    units: list[CvUnit] = []
    train_dir = find_dir(plan.data_root, "train")
    if train_dir is not None:
        for path in list_images(train_dir):
            rgb, _ = _resample(read_rgb(path), None, factor)
            label = parse_filename_label(path.name, k)
            units.append(CvUnit(path.name, rgb, None, fold_of(path.name), label))
    for pair in load_pairs(plan.data_root) if find_dir(plan.data_root, "val") else []:
        rgb, mask = _resample(pair.rgb, pair.mask, factor)
        units.append(CvUnit(pair.name, rgb, mask, fold_of(pair.name)))
    if not units:
        raise DatasetError(f"no images under {plan.data_root}")
    return units


def load_units(plan: CvPlan) -> list[CvUnit]:
    """Decode every unit of the plan (images cut into their configured bands, or every image of
    each listed slide)."""
    if plan.by_prefix:
        return _load_by_prefix(plan)
    fold_of = {n: i for i, fold in enumerate(plan.folds) for n in fold}
    stems = sorted({n.split(SPLIT_MARK)[0] for n in fold_of})
    units: list[CvUnit] = []
    for pair in load_pairs(plan.data_root, stems):
        bands = plan.splits.get(pair.name)
        if bands is None:
            units.append(CvUnit(pair.name, pair.rgb, pair.mask, fold_of[pair.name]))
            continue
        for i, (start, stop) in enumerate(bands):
            name = f"{pair.name}{SPLIT_MARK}{i}"
            units.append(CvUnit(name, pair.rgb[start:stop], pair.mask[start:stop], fold_of[name]))
    missing = set(fold_of) - {u.name for u in units}
    if missing:
        raise DatasetError(f"units of the fold plan not found: {', '.join(sorted(missing))}")
    return units


def assign_folds(
    units: Sequence[CvUnit],
    num_folds: int,
    anchor_class: int,
    min_fraction: float,
    dataset: str = "wsss4luad",
) -> dict[str, int]:
    """Stratified folds: units dominated by ``anchor_class`` (the rare one) one per fold first,
    then every class combination dealt round-robin, largest unit first. Used once to write a
    config; the config, not this function, is what a CV run reads."""
    k = len(DATASETS[dataset].classes)
    masked = [u for u in units if u.mask is not None]

    def combo(u: CvUnit) -> tuple[int, ...]:
        assert u.mask is not None
        counts = np.bincount(u.mask.ravel(), minlength=k + 1)[:k] / u.mask.size
        return tuple(int(v > min_fraction) for v in counts)

    def dominated(u: CvUnit) -> bool:
        assert u.mask is not None
        counts = np.bincount(u.mask.ravel(), minlength=k + 1)[:k]
        return bool(counts[anchor_class] > 0 and counts.argmax() == anchor_class)

    anchors = sorted(u.name for u in masked if dominated(u))
    if len(anchors) < num_folds:
        raise DatasetError(
            f"only {len(anchors)} units hold class {anchor_class}: fewer than {num_folds} folds"
        )
    folds = {n: i % num_folds for i, n in enumerate(anchors)}
    groups: dict[tuple[int, ...], list[CvUnit]] = {}
    for u in masked:
        if u.name not in folds:
            groups.setdefault(combo(u), []).append(u)
    i = 0
    for key in sorted(groups):
        for u in sorted(groups[key], key=lambda u: (-u.rgb.shape[0] * u.rgb.shape[1], u.name)):
            folds[u.name] = i % num_folds
            i += 1
    return folds


def unit_confusion(mask: np.ndarray, labels: np.ndarray, dataset: str) -> np.ndarray:
    """K x K confusion of one unit (rows truth, columns prediction), ignore pixels left out."""
    spec = DATASETS[dataset]
    k = len(spec.classes)
    return confusion_matrix(mask, labels, k + 1, [spec.ignore_index])[:k, :k]


def predicted_presence(labels: np.ndarray, num_classes: int, min_fraction: float) -> np.ndarray:
    """Classes the prediction calls present in an image: those on more than ``min_fraction`` of its
    labelled pixels (``labels``: 1-based class map, 0 = no tissue), as an image-level label."""
    counts = np.bincount(labels.ravel(), minlength=num_classes + 1)[1 : num_classes + 1]
    return (counts / max(int(counts.sum()), 1) > min_fraction).astype(np.float32)


def presence_counts(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Per class (true positives, false positives, false negatives) of image-level labels."""
    t, p = truth.astype(bool), predicted.astype(bool)
    return np.stack([(t & p), (~t & p), (t & ~p)], axis=1).astype(np.int64)


def presence_f1(counts: np.ndarray) -> np.ndarray:
    """Per-class F1 of summed :func:`presence_counts` rows (NaN for a class never present nor
    predicted): how a slide without masks scores a held-out fold."""
    tp, fp, fn = counts[:, 0].astype(np.float64), counts[:, 1], counts[:, 2]
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)


def iou_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Per-class IoU; NaN for a class neither present nor predicted."""
    inter = np.diag(cm).astype(np.float64)
    union = cm.sum(0) + cm.sum(1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), np.nan)


def miou_present(cm: np.ndarray) -> float:
    """mIoU over the classes present in the ground truth (a fold without a class is not
    charged for it; the BCSS-WSSS figure too)."""
    present = cm.sum(1) > 0
    return float(np.nanmean(np.where(present, iou_from_confusion(cm), np.nan)))


@dataclass
class CvResult:
    """Out-of-fold confusion matrices of one recipe: one per (seed, fold)."""

    classes: tuple[str, ...]
    confusions: dict[tuple[int, int], np.ndarray]  # (seed, fold) -> K x K

    def pooled(self, seed: int) -> np.ndarray:
        return sum((cm for (s, _), cm in self.confusions.items() if s == seed), np.zeros((1, 1), np.int64))

    def summary(self) -> dict[str, Any]:
        """mean ± sd of per-fold mIoU (over folds and seeds), pooled mIoU mean ± sd over seeds,
        per-class pooled IoU mean over seeds, and the pooled confusion summed over seeds."""
        seeds = sorted({s for s, _ in self.confusions})
        per_fold = [miou_present(cm) for cm in self.confusions.values()]
        pooled = [self.pooled(s) for s in seeds]
        pooled_miou = [miou_present(cm) for cm in pooled]
        with warnings.catch_warnings():  # a class absent from every pooled matrix stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            per_class = np.nanmean(np.stack([iou_from_confusion(cm) for cm in pooled]), axis=0)
        return {
            "folds_miou_mean": float(np.mean(per_fold)),
            "folds_miou_sd": float(np.std(per_fold)),
            "pooled_miou_mean": float(np.mean(pooled_miou)),
            "pooled_miou_sd": float(np.std(pooled_miou)),
            "iou": {c: round(float(v), 4) for c, v in zip(self.classes, per_class, strict=True)},
            "seeds": seeds,
            "runs": len(self.confusions),
            "per_fold": {
                f"{s}/{f}": round(miou_present(cm), 4) for (s, f), cm in sorted(self.confusions.items())
            },
            "confusion": sum(pooled, np.zeros((1, 1), np.int64)).tolist(),
        }
