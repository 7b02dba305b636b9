"""Cross-validation: fixed folds on the real crops, the CV command and the shipped file's manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fprotoseg.model.cam_cnn import CamCnnRecipe, train
from fprotoseg.model.cv import (
    CvResult,
    assign_folds,
    iou_from_confusion,
    load_units,
    miou_present,
    read_plan,
)
from fprotoseg.model.datasets import DatasetError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan_units(shared_data: Path):
    plan = read_plan("cv_wsss4luad", shared_data)
    return plan, load_units(plan)


def test_every_crop_is_in_exactly_one_fold_and_normal_in_every_fold(plan_units) -> None:
    plan, units = plan_units
    assert plan.num_folds == 5
    stems = {u.name.split("#")[0] for u in units}
    assert len(stems) == 67 and len(units) == 70
    for fold in range(5):
        masks = [u.mask for u in units if u.fold == fold]
        assert any((m == 2).any() for m in masks), f"fold {fold} has no Normal"
        assert any((m == 0).any() for m in masks) and any((m == 1).any() for m in masks)
    # the bands of 68.png cover it exactly once
    bands = [u for u in units if u.name.startswith("68.png#")]
    assert sum(u.mask.shape[0] for u in bands) == 1710


def test_the_configured_folds_are_the_stratified_assignment(plan_units) -> None:
    """The config is the written-down output of assign_folds: nobody hand-picked a fold."""
    _, units = plan_units
    assigned = assign_folds(units, 5, anchor_class=2, min_fraction=0.02)
    assert assigned == {u.name: u.fold for u in units}


def test_scores_over_present_classes() -> None:
    cm = np.array([[8, 2, 0], [2, 8, 0], [0, 0, 0]])  # Normal absent and never predicted
    assert np.isnan(iou_from_confusion(cm)[2])
    assert miou_present(cm) == pytest.approx(8 / 12)
    res = CvResult(("a", "b", "c"), {(0, 0): cm, (0, 1): cm * 2})
    s = res.summary()
    assert s["folds_miou_mean"] == pytest.approx(8 / 12) and s["folds_miou_sd"] == pytest.approx(0)
    assert s["confusion"] == (cm * 3).tolist()


def test_a_recipe_refuses_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nhed_sigmaa: 0.1\n")
    with pytest.raises(DatasetError, match="hed_sigmaa"):
        CamCnnRecipe.from_yaml(path)
    assert CamCnnRecipe().receptive_field_px == 75
    assert CamCnnRecipe().output_stride == 8


def test_training_lowers_the_loss_on_real_crops(plan_units) -> None:
    _, units = plan_units
    losses: list[float] = []
    recipe = CamCnnRecipe(steps=40, batch=8, channels=(8, 16, 32, 32), lr=3e-3)
    train([(u.rgb, u.mask) for u in units[:10]], recipe, 0, progress=lambda _, loss: losses.append(loss))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


@pytest.mark.slow
def test_cv_command_then_the_shipped_file_records_cv_figures(tmp_path: Path, shared_data: Path) -> None:
    """bench/cv.py trains and scores a fold; model/ship.py trains on all units and writes the CV
    figures (never a score on its own training data) into a checkpoint the service loads."""
    recipe = tmp_path / "quick.yaml"
    recipe.write_text("name: quick\nsteps: 3\nbatch: 4\nchannels: [8, 8, 16, 16]\n")
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nsteps: 2\nbatch: 4\nchannels: [8, 8, 16, 16]\n")
    out = tmp_path / "cv"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "cv.py"),
        str(recipe),
        str(base),
        "--folds",
        "0",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| quick | 1 |" in proc.stdout and "| base | 1 |" in proc.stdout
    runs = [json.loads(line) for line in (out / "cv_wsss4luad.jsonl").read_text().splitlines()]
    assert {r["recipe"] for r in runs} == {"quick", "base"}
    assert all(np.array(r["confusion"]).sum() > 0 for r in runs)

    ckpt = tmp_path / "shipped.safetensors"
    ship = [sys.executable, "-m", "fprotoseg.model.ship", str(recipe), "--baseline", str(base)]
    ship += ["--cv", str(out / "cv_wsss4luad.jsonl"), "--out", str(ckpt), "--shared-data", str(shared_data)]
    proc = subprocess.run(ship, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from fprotoseg.model import load_segmenter

    seg = load_segmenter(ckpt, device="cpu")
    metrics = seg.manifest["metrics"]
    assert metrics["scored_on_training_data"] is False
    assert metrics["cv_recipe"]["runs"] == 1 and metrics["cv_baseline"]["runs"] == 1
    assert seg.manifest["domain"]["organ"] == ["lung"]
    scores = seg.predict(np.full((2, seg.tile_size_px, seg.tile_size_px, 3), 200, np.uint8))
    assert scores.shape == (2, 3, seg.tile_size_px // 8, seg.tile_size_px // 8)
    assert np.allclose(scores.sum(1), 1, atol=1e-3)
