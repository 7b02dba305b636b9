"""Segmentation metrics from a confusion matrix, in the protocols the WSSS papers define.

Masks of LUAD-HistoSeg and BCSS-WSSS hold a background value (4 = white: glass, fat, air) beside
the K tissue classes; a network may predict background too (stage 2 with ``stage2.background``,
channel K). Every matrix here is (K+1) x (K+1), rows = ground truth, columns = prediction, with
background at index ``background`` (= K); the two protocols differ in what they do with it:

- ``background_included`` (TPRO, MICCAI 2023; PBIP, CVPR 2025 on LUAD-HistoSeg and BCSS-WSSS:
  ``ConfusionMatrixAllClass(num_classes=K+1)``, mIoU = ``iu[:-1].mean()``): ground-truth
  background pixels stay in the matrix, so tissue predicted on background costs that tissue
  class its precision; mIoU is the mean over the K tissue classes (background IoU is reported as
  ``iou_background``, not averaged in). A K-class network that cannot say "not tissue" scores
  0.5 on a mask that is half background even where it gets every tissue pixel right.
- ``background_excluded`` (the WSSS4LUAD challenge: mask 3 = background, not scored; MLPS, the
  LUAD-HistoSeg/BCSS-WSSS paper, Han et al. 2022: predictions on ground-truth background are set
  to background before counting): ground-truth background pixels leave the matrix; a tissue pixel
  predicted as background is still a miss of its class. mIoU over the K tissue classes.

Old names stay accepted: ``ignore_background`` = ``background_excluded``,
``tissue_mean_with_background`` = ``background_included``; ``paper`` picks the dataset's
published protocol (:data:`PAPER_PROTOCOL`).

FwIoU weights each class IoU by its ground-truth frequency; Dice = 2TP / (2TP + FP + FN).
Classes absent from both ground truth and prediction have no IoU (NaN) and are left out of means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PROTOCOLS = ("background_excluded", "background_included")
PROTOCOL_ALIASES = {
    "ignore_background": "background_excluded",
    "tissue_mean_with_background": "background_included",
    "wsss4luad_challenge": "background_excluded",
    "mlps": "background_excluded",
    "tpro": "background_included",
    "pbip": "background_included",
}
# where each protocol is defined: what the evaluate JSON quotes beside the protocol's name
PROTOCOL_SOURCES = {
    "background_excluded": "WSSS4LUAD challenge (Han et al. 2022); MLPS (Han et al., MedIA 2022)",
    "background_included": "TPRO (Zhang et al., MICCAI 2023); PBIP (Tang et al., CVPR 2025)",
}
# the protocol each dataset's papers report (the FProtoSeg paper compares with TPRO/PBIP)
PAPER_PROTOCOL = {
    "wsss4luad": "background_excluded",
    "luad-histoseg": "background_included",
    "bcss-wsss": "background_included",
}


def resolve_protocol(protocol: str, dataset: str | None = None) -> str:
    """The canonical protocol name for a name, an alias or ``paper`` (the dataset's own)."""
    if protocol == "paper":
        if dataset not in PAPER_PROTOCOL:
            raise ValueError(f"no published protocol known for dataset {dataset!r}")
        return PAPER_PROTOCOL[dataset]
    name = PROTOCOL_ALIASES.get(protocol, protocol)
    if name not in PROTOCOLS:
        known = ", ".join([*PROTOCOLS, *PROTOCOL_ALIASES, "paper"])
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {known}")
    return name


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


def evaluate_protocol(
    cm_full: np.ndarray, class_names: Sequence[str], protocol: str, background: int | None
) -> dict[str, Any]:
    """Scores from a matrix with background at index ``background`` (see the module docstring).

    ``cm_full`` is (K, K) or (K+1, K+1); with ``background`` None (or a (K, K) matrix) there is
    no background row and both protocols agree. Returns :func:`scores_from_confusion`'s keys plus
    ``protocol`` (canonical name) and, where the matrix has a background row, ``iou_background``.
    """
    name = resolve_protocol(protocol)
    cm_full = np.asarray(cm_full)
    k = len(class_names)
    names = list(class_names)
    if background is None or len(cm_full) == k:
        result = scores_from_confusion(cm_full, names)
        result["protocol"] = name
        return result
    tissue = [i for i in range(len(cm_full)) if i != background][:k]
    names.insert(background, "background")
    cm = cm_full.astype(np.int64, copy=True)
    if name == "background_excluded":
        cm[background, :] = 0  # ground-truth background is not scored
    result = scores_from_confusion(cm, names, tissue=tissue)
    if name == "background_included":
        full = scores_from_confusion(cm, names)
        result["iou_background"] = full["iou"]["background"]
    result["protocol"] = name
    return result
