"""The packaged BCSS-WSSS checkpoint: breast classes at 0.5 µm/px, Macenko-normalised, carrying
its leave-one-slide-out figures; scored in the paper's protocol through `fprotoseg evaluate`, and
selectable for a slide with --checkpoint / FPROTOSEG_CHECKPOINT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fprotoseg.model.checkpoint import DEFAULT_CHECKPOINT

BCSS_CHECKPOINT = DEFAULT_CHECKPOINT.parent / "fprotoseg_bcss_wsss.safetensors"
pytestmark = pytest.mark.skipif(not BCSS_CHECKPOINT.is_file(), reason="BCSS-WSSS checkpoint not built")

# mean over the classes the validation masks hold (stroma, lymphocytes). The shipped file was
# trained on every slide, those patches' image-level labels included, so this is a regression floor
# for the evaluate path, not a held-out figure (the manifest's cv_recipe is: 0.439 on crops).
VALID_MIOU_PRESENT_FLOOR = 0.30
# the leave-one-slide-out target on the held-out slide (crops, mean over seeds)
CV_MIOU_PRESENT_FLOOR = 0.40


def test_bcss_manifest() -> None:
    from fprotoseg.model.checkpoint import read_checkpoint

    _, manifest = read_checkpoint(BCSS_CHECKPOINT)
    assert [c["name"] for c in manifest["classes"]] == ["Tumor", "Stroma", "Lymphocytes", "Necrosis"]
    assert manifest["mpp"] == 0.5 and manifest["domain"]["organ"] == ["breast"]
    assert manifest["stain_norm"]["method"] == "macenko"
    assert "image-level" in manifest["training"]["supervision"]
    metrics = manifest["metrics"]
    assert metrics["scored_on_training_data"] is False
    recipe, baseline = metrics["cv_recipe"], metrics["cv_baseline"]
    assert recipe["runs"] >= 2 and recipe["folds_miou_mean"] >= CV_MIOU_PRESENT_FLOOR
    assert recipe["folds_miou_mean"] > baseline["folds_miou_mean"]
    assert recipe["slide_folds_miou_mean"] > baseline["slide_folds_miou_mean"]
    assert min(recipe["iou"]["Stroma"], recipe["iou"]["Lymphocytes"]) >= 0.15
    assert BCSS_CHECKPOINT.stat().st_size < 20 * 1024 * 1024


def test_evaluate_cli_scores_bcss_in_the_papers_protocol(shared_data: Path) -> None:
    """`fprotoseg evaluate --dataset bcss-wsss --data-root DIR --checkpoint PATH`: mask 4 is
    background, one JSON object with the mean over present classes."""
    root = shared_data / "bcss_wsss" / "valid"
    cmd = [sys.executable, "-m", "fprotoseg.app.cli", "evaluate", "--dataset", "bcss-wsss"]
    cmd += ["--data-root", str(root), "--checkpoint", str(BCSS_CHECKPOINT)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["images"] == 14 and result["dataset"] == "bcss-wsss"
    assert set(result["iou"]) == {"TUM", "STR", "LYM", "NEC"}
    assert result["miou_present"] >= VALID_MIOU_PRESENT_FLOOR, result["iou"]
    assert result["iou"]["STR"] > 0 and result["iou"]["LYM"] > 0


@pytest.mark.slow
def test_a_slide_with_the_bcss_checkpoint_from_the_environment(shared_data: Path, tmp_path: Path) -> None:
    """FPROTOSEG_CHECKPOINT selects the second model: the result names its four classes."""
    slide = shared_data / "slides" / "CMU-1-Small-Region.svs"
    env = {**os.environ, "FPROTOSEG_CHECKPOINT": str(BCSS_CHECKPOINT)}
    cmd = [sys.executable, "-m", "fprotoseg.app.cli", "segment", str(slide), "--out", str(tmp_path)]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [c["name"] for c in stats["classes"]] == ["Tumor", "Stroma", "Lymphocytes", "Necrosis"]
    assert abs(sum(c["fraction_of_tissue"] for c in stats["classes"]) - 1.0) < 1e-6
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert "bcss" in json.dumps(provenance["model"]).lower()
