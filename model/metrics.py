"""Segmentation metrics from a confusion matrix, in the two protocols WSSS papers use.

- ``ignore_background`` (TPRO, WSSS4LUAD): ground-truth background/ignore pixels are dropped; the
  matrix is K x K over the tissue classes; mIoU = mean IoU over the K classes.
- ``tissue_mean_with_background`` (PBIP, FProtoSeg on BCSS-WSSS/LUAD-HistoSeg): the (K+1) x (K+1)
  matrix including background is accumulated, IoU is computed per class on it, and mIoU is the
  mean over the K tissue classes only (background predicted as tissue costs tissue precision).

FwIoU weights each class IoU by its ground-truth frequency; Dice = 2TP / (2TP + FP + FN).
Classes absent from both ground truth and prediction have no IoU (NaN) and are left out of means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PROTOCOLS = ("ignore_background", "tissue_mean_with_background")


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_labels: int, ignore: Sequence[int] = ()
) -> np.ndarray:
    """(num_labels, num_labels) int64 counts, rows = ground truth, columns = prediction."""
    gt = np.asarray(gt).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    keep = (gt >= 0) & (gt < num_labels)
    for v in ignore:
        keep &= gt != v
    idx = gt[keep] * num_labels + pred[keep]
    return np.bincount(idx, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def scores_from_confusion(
    cm: np.ndarray, class_names: Sequence[str], tissue: Sequence[int] | None = None
) -> dict[str, Any]:
    """IoU, Dice per class, mIoU/mDice over ``tissue`` classes (default: all), FwIoU, accuracy."""
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    tissue = list(range(len(cm))) if tissue is None else list(tissue)
    gt_freq = cm.sum(1)
    t_iou, t_freq = iou[tissue], gt_freq[tissue]
    valid = ~np.isnan(t_iou)
    fwiou = float((t_freq[valid] * t_iou[valid]).sum() / max(t_freq[valid].sum(), 1.0))
    return {
        "miou": float(np.nanmean(t_iou)) if valid.any() else float("nan"),
        # the mean over classes the ground truth holds (a class only predicted counts elsewhere:
        # as false positives of the present ones); what BCSS-WSSS test sets without tumour report
        "miou_present": float(np.nanmean(t_iou[t_freq > 0])) if (t_freq > 0).any() else float("nan"),
        "iou": {class_names[i]: _nan_to_none(iou[i]) for i in tissue},
        "fwiou": fwiou,
        "dice": {class_names[i]: _nan_to_none(dice[i]) for i in tissue},
        "mdice": float(np.nanmean(dice[tissue])) if valid.any() else float("nan"),
        "pixel_accuracy": float(tp[tissue].sum() / max(cm[tissue].sum(), 1.0)),
        "pixels": int(cm[tissue].sum()),
    }


def _nan_to_none(v: float) -> float | None:
    return None if np.isnan(v) else float(v)


def evaluate_protocol(cm_full: np.ndarray, class_names: Sequence[str], protocol: str, background: int | None):
    """Scores from a matrix whose last row/column is background (or without one).

    ``cm_full`` is (K, K) when the dataset has no background class, else (K+1, K+1) with
    background at index ``background``.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    k = len(class_names)
    tissue = [i for i in range(len(cm_full)) if i != background][:k]
    if protocol == "ignore_background" or background is None:
        sub = cm_full[np.ix_(tissue, tissue)]
        return scores_from_confusion(sub, list(class_names))
    names = list(class_names)
    names.insert(background, "background")
    return scores_from_confusion(cm_full, names, tissue=tissue)
