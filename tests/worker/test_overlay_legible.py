"""``overlay.png``: every class of the packaged model reads over real H&E.

Why: with one alpha for all classes, Stroma's pale green over pink stroma moved the picture by
less than the eye notices. Each class now gets the alpha that moves the tissue under it by
``OVERLAY_MIN_CONTRAST_RGB`` on average; this checks the written PNG on a real slide, class by class,
as if the whole tissue were that class (the hardest case for a pale class).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from fprotoseg.model.checkpoint import read_checkpoint
from fprotoseg.worker.wsi.outputs import OVERLAY_MIN_CONTRAST_RGB, write_overlay_png
from fprotoseg.worker.wsi.slide import open_slide
from fprotoseg.worker.wsi.tissue import saturation
from tests.conftest import REPO_ROOT

PACKAGED = REPO_ROOT / "model" / "weights" / "fprotoseg_wsss4luad.safetensors"


@pytest.fixture(scope="module")
def thumbnail(shared_data: Path) -> np.ndarray:
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        image, _ = slide.read_scaled(4.0)
    return image


def test_every_packaged_class_is_legible_over_he(thumbnail: np.ndarray, tmp_path: Path) -> None:
    _, manifest = read_checkpoint(PACKAGED)
    classes = [SimpleNamespace(name=c["name"], color=tuple(c["color"])) for c in manifest["classes"]]
    tissue = saturation(thumbnail) > 40
    assert 0.1 < tissue.mean() < 0.9
    for k, cls in enumerate(classes):
        labels = np.where(tissue, k + 1, 0).astype(np.uint8)
        stats = {
            "tissue_area_mm2": 1.0,
            "classes": [
                {"name": c.name, "color": list(c.color), "fraction_of_tissue": float(j == k)}
                for j, c in enumerate(classes)
            ],
        }
        path = write_overlay_png(tmp_path / f"{cls.name}.png", thumbnail, labels, classes, stats)
        picture = np.asarray(Image.open(path).convert("RGB"))[: thumbnail.shape[0], : thumbnail.shape[1]]
        moved = np.linalg.norm(picture[tissue].astype(float) - thumbnail[tissue].astype(float), axis=1)
        assert moved.mean() >= 0.95 * OVERLAY_MIN_CONTRAST_RGB, (cls.name, moved.mean())
        assert np.array_equal(picture[~tissue], thumbnail[~tissue])  # glass stays as scanned
