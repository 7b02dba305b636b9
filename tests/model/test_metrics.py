"""Both metric protocols on hand-made confusion matrices (numbers worked out by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from fprotoseg.model.training.metrics import confusion_matrix, evaluate_protocol, scores_from_confusion


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


def _half_background_pair():
    from fprotoseg.model.training.datasets import MaskedImage

    mask = np.full((8, 8), 4)  # LUAD-HistoSeg/BCSS-WSSS: 4 = background (white)
    mask[:, :4] = 0  # half tumour
    return MaskedImage("half.png", np.zeros((8, 8, 3), np.uint8), mask)


def test_background_included_perfect_prediction_with_background_scores_one() -> None:
    """TPRO/PBIP's protocol keeps ground-truth background in the matrix: a network that predicts
    background where the mask has it scores 1.0; a K-class network (tissue everywhere, every
    tissue pixel right) scores 0.5 on a half-background mask."""
    from fprotoseg.model.training.evaluate import score_pairs

    pair = _half_background_pair()
    perfect = score_pairs([pair], lambda p: p.mask.copy(), "luad-histoseg", "background_included")
    assert perfect["miou"] == pytest.approx(1.0) and perfect["iou_background"] == pytest.approx(1.0)
    assert perfect["protocol"] == "background_included" and "TPRO" in perfect["protocol_source"]
    k_class = score_pairs([pair], lambda p: np.zeros_like(p.mask), "luad-histoseg", "background_included")
    assert k_class["miou"] == pytest.approx(0.5)
    # the excluded protocol cannot tell them apart (background not scored) ...
    excluded = score_pairs([pair], lambda p: np.zeros_like(p.mask), "luad-histoseg", "background_excluded")
    assert excluded["miou"] == pytest.approx(1.0) and "MLPS" in excluded["protocol_source"]
    # ... but background predicted on tissue is a miss under both
    wrong = score_pairs([pair], lambda p: np.full(p.mask.shape, 4), "bcss-wsss", "background_excluded")
    assert wrong["iou"]["TUM"] == pytest.approx(0.0)


def test_protocol_names_aliases_and_paper_per_dataset() -> None:
    from fprotoseg.model.training.evaluate import score_pairs
    from fprotoseg.model.training.metrics import resolve_protocol

    assert resolve_protocol("ignore_background") == "background_excluded"
    assert resolve_protocol("tissue_mean_with_background") == "background_included"
    assert resolve_protocol("tpro") == resolve_protocol("pbip") == "background_included"
    assert resolve_protocol("paper", "bcss-wsss") == "background_included"
    assert resolve_protocol("paper", "luad-histoseg") == "background_included"
    assert resolve_protocol("paper", "wsss4luad") == "background_excluded"
    # WSSS4LUAD masks have no background to score (3 = ignore): the challenge protocol, K x K
    # for a K-class labelling, (K+1) x (K+1) once a labelling says background
    from fprotoseg.model.training.datasets import MaskedImage

    pair = MaskedImage("w.png", np.zeros((4, 4, 3), np.uint8), np.array([[0, 1, 2, 3]] * 4))
    r = score_pairs([pair], lambda p: np.clip(p.mask, 0, 2), "wsss4luad", "paper")
    assert r["protocol"] == "background_excluded" and len(r["confusion_matrix"]) == 3
    assert r["miou"] == pytest.approx(1.0)
    r = score_pairs([pair], lambda p: np.full((4, 4), 3), "wsss4luad")
    assert len(r["confusion_matrix"]) == 4 and r["miou"] == pytest.approx(0.0)
