"""How sure the network was, per class: the area it labelled with low confidence.

Why: a class area is read as a fact; the share of it the network chose by a narrow margin tells a
reader how much of that fact is a guess. The confidence of an output pixel is the softmax
probability of the chosen class over the network's scores, sampled like the labels
(:class:`~fprotoseg.worker.wsi.stitch.LabelMapStitcher` keeps it as uint8, x 255). It is not
calibrated: the threshold is a stated cut, the same for every slide, not a probability of error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

LOW_CONFIDENCE = 0.6  # a pixel whose chosen class has a softmax probability below this is "low"


def confidence_stats(
    label_map: np.ndarray,
    confidence_map: np.ndarray,
    classes: Sequence[Any],
    output_mpp: float,
    threshold: float = LOW_CONFIDENCE,
    rows_per_band: int = 256,
) -> dict[str, Any]:
    """Per class, the area (µm²) and share of its area whose confidence is below ``threshold``."""
    n = len(classes) + 1
    low = np.zeros(n, dtype=np.int64)
    total = np.zeros(n, dtype=np.int64)
    cut = round(threshold * 255)
    for r0 in range(0, label_map.shape[0], rows_per_band):
        labels = label_map[r0 : r0 + rows_per_band]
        sure = confidence_map[r0 : r0 + rows_per_band]
        total += np.bincount(labels.ravel(), minlength=256)[:n]
        low += np.bincount(labels[sure < cut].ravel(), minlength=256)[:n]
    px_um2 = output_mpp * output_mpp
    return {
        "measure": "softmax probability of the chosen class (uncalibrated)",
        "threshold": threshold,
        "classes": [
            {
                "name": cls.name,
                "low_confidence_area_um2": int(low[k + 1]) * px_um2,
                "low_confidence_fraction": (int(low[k + 1]) / int(total[k + 1])) if total[k + 1] else 0.0,
            }
            for k, cls in enumerate(classes)
        ],
    }
