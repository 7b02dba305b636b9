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

from fprotoseg.model.datasets import DATASETS, DatasetError, load_pairs
from fprotoseg.model.metrics import confusion_matrix

CONFIG_DIR = Path(__file__).parent / "recipes"  # CV plans and CAM-CNN recipes, not training configs
SPLIT_MARK = "#"  # "68.png#2": the third band of 68.png named in the config's ``splits``


@dataclass
class CvUnit:
    """One image (or one band of a large image) that belongs to exactly one fold."""

    name: str
    rgb: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) int64 class indices (the dataset's ignore index outside tissue)
    fold: int


@dataclass(frozen=True)
class CvPlan:
    """A fixed fold plan read from a config: dataset, data root and the units of each fold."""

    dataset: str
    data_root: Path
    folds: tuple[tuple[str, ...], ...]
    splits: dict[str, tuple[tuple[int, int], ...]]

    @property
    def num_folds(self) -> int:
        return len(self.folds)


def read_plan(config: str | Path, shared_data: str | Path) -> CvPlan:
    """The fold plan of ``config`` (a path or a name in model/configs), data under ``shared_data``."""
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
    return CvPlan(str(raw["dataset"]), Path(shared_data) / str(raw["data_root"]), folds, splits)


def load_units(plan: CvPlan) -> list[CvUnit]:
    """Decode every unit of the plan (images cut into their configured bands)."""
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
    units: Sequence[CvUnit], num_folds: int, anchor_class: int, min_fraction: float
) -> dict[str, int]:
    """Stratified folds: units dominated by ``anchor_class`` (the rare one) one per fold first,
    then every class combination dealt round-robin, largest unit first. Used once to write a
    config; the config, not this function, is what a CV run reads."""
    k = len(DATASETS["wsss4luad"].classes)

    def combo(u: CvUnit) -> tuple[int, ...]:
        counts = np.bincount(u.mask.ravel(), minlength=k + 1)[:k] / u.mask.size
        return tuple(int(v > min_fraction) for v in counts)

    def dominated(u: CvUnit) -> bool:
        counts = np.bincount(u.mask.ravel(), minlength=k + 1)[:k]
        return bool(counts[anchor_class] > 0 and counts.argmax() == anchor_class)

    anchors = sorted(u.name for u in units if dominated(u))
    if len(anchors) < num_folds:
        raise DatasetError(
            f"only {len(anchors)} units hold class {anchor_class}: fewer than {num_folds} folds"
        )
    folds = {n: i % num_folds for i, n in enumerate(anchors)}
    groups: dict[tuple[int, ...], list[CvUnit]] = {}
    for u in units:
        if u.name not in folds:
            groups.setdefault(combo(u), []).append(u)
    i = 0
    for key in sorted(groups):
        for u in sorted(groups[key], key=lambda u: (-u.mask.size, u.name)):
            folds[u.name] = i % num_folds
            i += 1
    return folds


def unit_confusion(mask: np.ndarray, labels: np.ndarray, dataset: str) -> np.ndarray:
    """K x K confusion of one unit (rows truth, columns prediction), ignore pixels left out."""
    spec = DATASETS[dataset]
    k = len(spec.classes)
    return confusion_matrix(mask, labels, k + 1, [spec.ignore_index])[:k, :k]


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
