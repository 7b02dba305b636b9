"""Macenko stain normalisation on real H&E crops: another lab's stain is mapped back, glass stays
glass, the reference travels in the manifest, and training restains what it is told to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint
from fprotoseg.model.errors import CheckpointError
from fprotoseg.model.stain_norm import StainEstimate, StainNormaliser, normalise_image
from fprotoseg.model.training.cam_cnn import CamCnnRecipe, TrainImage, restain
from fprotoseg.model.training.datasets import DatasetError
from fprotoseg.model.training.stain import STAIN_SHIFTS, shift_stain

CROPS = "masks/wsss4luad/test/img"


@pytest.fixture(scope="module")
def crops(shared_data: Path) -> list[np.ndarray]:
    files = sorted((shared_data / CROPS).glob("*.png"))[:10]
    assert len(files) == 10
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def _restained(rgb: np.ndarray, reference: StainEstimate) -> np.ndarray:
    source = StainEstimate.of_image(rgb)
    assert source is not None
    return StainNormaliser(source, reference)(rgb).astype(np.float64)


def test_a_restained_lab_comes_back_to_the_reference(crops: list[np.ndarray]) -> None:
    """More or less haematoxylin and eosin (the validation's stain shifts): after normalisation the
    shifted crop and the original differ by under half of what they differed before."""
    reference = StainEstimate.reference([e for e in map(StainEstimate.of_image, crops) if e is not None])
    tissue_crops = [rgb for rgb in crops if (rgb.min(axis=2) > 225).mean() < 0.2]  # mostly tissue
    assert len(tissue_crops) >= 5
    for rgb in tissue_crops:
        for shift in STAIN_SHIFTS[:2]:  # the scale shifts: what Macenko's rescaling undoes
            other = shift_stain(rgb, shift)
            before = np.abs(rgb.astype(np.float64) - other).mean()
            after = np.abs(_restained(rgb, reference) - _restained(other, reference)).mean()
            assert after < before / 2, (shift, before, after)


def test_glass_stays_white_and_the_map_is_one_per_image(crops: list[np.ndarray]) -> None:
    reference = StainEstimate.of_image(crops[1])
    source = StainEstimate.of_image(crops[0])
    assert reference is not None and source is not None
    normalise = StainNormaliser(source, reference)
    glass = np.full((4, 64, 64, 3), 255, np.uint8)
    assert np.abs(normalise(glass).astype(int) - 255).max() <= 1
    # a tile restained alone equals the same pixels restained inside the whole image: no seams
    whole = normalise(crops[0])
    assert np.array_equal(normalise(crops[0][:64, :64]), whole[:64, :64])


def test_the_reference_travels_in_the_manifest(crops: list[np.ndarray]) -> None:
    estimate = StainEstimate.of_image(crops[0])
    assert estimate is not None
    doc = estimate.as_json()
    again = StainEstimate.from_json(doc)
    assert np.allclose(again.stains, estimate.stains, atol=1e-4)
    assert np.allclose(again.max_concentration, estimate.max_concentration, atol=1e-4)
    with pytest.raises(ValueError, match="vahadane"):
        StainEstimate.from_json({**doc, "method": "vahadane"})
    # a checkpoint without stain_norm sees its pixels unchanged; with it, restained
    assert normalise_image({}, crops[2]) is crops[2]
    assert not np.array_equal(normalise_image({"stain_norm": doc}, crops[2]), crops[2])
    # too little stain to estimate from (glass): left as it is
    glass = np.full((100, 100, 3), 250, np.uint8)
    assert StainEstimate.of_image(glass) is None
    assert normalise_image({"stain_norm": doc}, glass) is glass


def test_training_restains_only_when_the_recipe_says_so(crops: list[np.ndarray], tmp_path: Path) -> None:
    images = [TrainImage(rgb, label=np.array([1, 0, 0])) for rgb in crops]
    same, extra = restain(images, CamCnnRecipe())
    assert extra == {} and all(a.rgb is b.rgb for a, b in zip(same, images, strict=True))
    restained, extra = restain(images, CamCnnRecipe(stain_norm="macenko"))
    reference = StainEstimate.from_json(extra["stain_norm"])
    # each restained crop now has the reference's stain: its own estimate is close to it
    for im in restained:
        est = StainEstimate.of_image(im.rgb)
        assert est is not None
        cos = np.sum(est.stains * reference.stains, axis=1)
        assert np.all(cos > 0.99), cos
    bad = tmp_path / "bad.yaml"
    bad.write_text("stain_norm: reinhard\n")
    with pytest.raises(DatasetError, match="stain_norm"):
        CamCnnRecipe.from_yaml(bad)


def test_a_broken_stain_reference_is_refused_at_load(crops: list[np.ndarray], tmp_path: Path) -> None:
    """A manifest whose stain reference cannot be used fails when the file is read (the model
    catalog, GET /models), not on a slide's first tile after QC and reading have run."""
    import torch
    from safetensors.torch import save_file

    from fprotoseg.model.checkpoint import MANIFEST_KEY

    estimate = StainEstimate.of_image(crops[0])
    assert estimate is not None
    manifest = {
        "architecture": "cam_cnn", "config": {}, "classes": [{"name": "Tumor", "color": [200, 0, 0]}],
        "mpp": 1.0, "tile_size_px": 224, "output_stride": 8,
    }
    state = {"w": torch.zeros(2)}
    good = tmp_path / "good.safetensors"
    save_checkpoint(good, state, {**manifest, "stain_norm": estimate.as_json()})
    assert read_checkpoint(good)[1]["stain_norm"]["method"] == "macenko"
    broken = [
        {"method": "vahadane"},
        {**estimate.as_json(), "stains": {"haematoxylin": [1.0, 0.0]}},
        {**estimate.as_json(), "max_concentration": [1.0, -2.0]},
        "macenko",
    ]
    for doc in broken:
        with pytest.raises(CheckpointError, match="stain_norm"):
            save_checkpoint(tmp_path / "refused.safetensors", state, {**manifest, "stain_norm": doc})
        # a file written by other means is refused when read
        path = tmp_path / "foreign.safetensors"
        meta = {MANIFEST_KEY: json.dumps({"format_version": 1, **manifest, "stain_norm": doc})}
        save_file(state, str(path), metadata=meta)
        with pytest.raises(CheckpointError, match="stain_norm"):
            read_checkpoint(path)
