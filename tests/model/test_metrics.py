"""Both metric protocols on hand-made confusion matrices (numbers worked out by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from fprotoseg.model.metrics import confusion_matrix, evaluate_protocol, scores_from_confusion


def test_confusion_matrix_counts_and_ignore() -> None:
    gt = np.array([0, 0, 1, 1, 2, 3])
    pred = np.array([0, 1, 1, 1, 0, 0])
    cm = confusion_matrix(gt, pred, 3, ignore=[3])
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]


def test_ignore_background_protocol_by_hand() -> None:
    # rows gt, cols pred: tumour 8 right 2 as stroma; stroma 6 right 4 as tumour; normal 5 right.
    cm = np.array([[8, 2, 0], [4, 6, 0], [0, 0, 5]])
    r = evaluate_protocol(cm, ["tumor", "stroma", "normal"], "ignore_background", None)
    assert r["iou"]["tumor"] == pytest.approx(8 / (8 + 4 + 2))
    assert r["iou"]["stroma"] == pytest.approx(6 / (6 + 2 + 4))
    assert r["iou"]["normal"] == pytest.approx(1.0)
    assert r["miou"] == pytest.approx((8 / 14 + 6 / 12 + 1.0) / 3)
    assert r["dice"]["tumor"] == pytest.approx(16 / (16 + 4 + 2))
    assert r["fwiou"] == pytest.approx((10 * 8 / 14 + 10 * 6 / 12 + 5 * 1.0) / 25)


def test_tissue_mean_with_background_protocol_by_hand() -> None:
    # 5x5: four tissue classes + background at index 4. Background predicted as TUM costs TUM.
    cm = np.zeros((5, 5), int)
    cm[0, 0], cm[1, 1], cm[2, 2], cm[3, 3], cm[4, 4] = 10, 10, 10, 10, 10
    cm[4, 0] = 10  # 10 background pixels called tumour
    r = evaluate_protocol(cm, ["TUM", "STR", "LYM", "NEC"], "tissue_mean_with_background", 4)
    assert r["iou"]["TUM"] == pytest.approx(0.5)
    assert r["miou"] == pytest.approx((0.5 + 1 + 1 + 1) / 4)  # background IoU not averaged in
    assert "background" not in r["iou"]
    # the other protocol drops ground-truth background, so the same matrix scores perfectly
    r2 = evaluate_protocol(cm, ["TUM", "STR", "LYM", "NEC"], "ignore_background", 4)
    assert r2["miou"] == pytest.approx(1.0)


def test_absent_class_is_left_out_of_the_mean() -> None:
    cm = np.array([[5, 5, 0], [0, 10, 0], [0, 0, 0]])
    r = scores_from_confusion(cm, ["a", "b", "c"])
    assert r["iou"]["c"] is None
    assert r["miou"] == pytest.approx((0.5 + 10 / 15) / 2)


def test_unknown_protocol_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown protocol"):
        evaluate_protocol(np.eye(3), ["a", "b", "c"], "other", None)
