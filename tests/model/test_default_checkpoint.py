"""The packaged default: a complete manifest whose figures are cross-validated, and a network that
loads through the seam and segments real tissue into more than one class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fprotoseg.model import DEFAULT_CHECKPOINT

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="packaged default not built")


def test_default_manifest_records_cross_validated_figures_only() -> None:
    from fprotoseg.model.checkpoint import read_checkpoint

    _, manifest = read_checkpoint(DEFAULT_CHECKPOINT)
    assert [c["name"] for c in manifest["classes"]] == ["Tumor", "Stroma", "Normal"]
    assert all(len(c["color"]) == 3 for c in manifest["classes"])
    assert manifest["mpp"] == 1.0
    assert manifest["domain"] == {
        "organ": ["lung"],
        "stain": "H&E",
        "mpp": 1.0,
        "classes": ["Tumor", "Stroma", "Normal"],
    }
    metrics = manifest["metrics"]
    assert metrics["scored_on_training_data"] is False
    assert "heldout_wsss4luad" not in metrics  # no score on data the file was trained on
    recipe, baseline = metrics["cv_recipe"], metrics["cv_baseline"]
    assert recipe["runs"] >= 5 and baseline["runs"] >= 5  # every fold of the plan
    assert recipe["pooled_miou_mean"] >= baseline["pooled_miou_mean"]  # it ships only if it is not worse
    assert 0 < recipe["slide_folds_miou_mean"] <= 1
    assert "image-level" in manifest["training"]["supervision"]
    # the inference options it ships with were chosen on the same folds, and carry their figures
    views = manifest["inference"]["dihedral_views"]
    assert metrics["cv_inference"]["dihedral_views"] == views
    assert metrics["cv_inference"]["folds_miou_mean"] >= recipe["folds_miou_mean"]
    assert metrics["cv_inference"]["slide_folds_miou_mean"] >= baseline["slide_folds_miou_mean"]
    assert DEFAULT_CHECKPOINT.stat().st_size < 20 * 1024 * 1024


def test_default_ships_the_refinement_its_folds_chose() -> None:
    """The guided refinement in the manifest is the one the fold networks chose, it beat the same
    networks without it on crops and on whole slides (nested: each fold scored with the choice of the
    other folds), and re-adding it from the committed CV table gives exactly the shipped manifest."""
    import copy

    from fprotoseg.model.checkpoint import read_checkpoint
    from fprotoseg.model.training.ship_refine import add_refinement

    _, manifest = read_checkpoint(DEFAULT_CHECKPOINT)
    refine = manifest["metrics"]["cv_refine"]
    assert manifest["inference"]["guided_refine"] == refine["guided_refine"]
    assert manifest["tile_size_px"] == refine["tile_size_px"]
    assert refine["folds_miou_mean"] > refine["without_refine_folds_miou_mean"]
    assert refine["slide_folds_miou_mean"] > refine["without_refine_slide_folds_miou_mean"]
    before = copy.deepcopy(manifest)
    del before["inference"]["guided_refine"], before["metrics"]["cv_refine"]
    table = Path(__file__).resolve().parents[2] / "bench" / "results" / "cv_refine_glass_jpeg.json"
    assert add_refinement(before, table) == manifest


def test_default_segments_a_real_crop_into_its_classes(shared_data: Path) -> None:
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.training.datasets import load_pairs
    from fprotoseg.model.training.evaluate import predict_labels

    seg = load_segmenter(None, device="cpu")
    (pair,) = load_pairs(shared_data / "masks" / "wsss4luad" / "test", ["68.png"])  # normal above tumour
    labels = predict_labels(seg.predict, pair.rgb, seg.tile_size_px)
    tissue = pair.mask < 3
    shares = np.bincount(labels[tissue].ravel(), minlength=3) / tissue.sum()
    assert (shares > 0.1).sum() >= 2, shares
