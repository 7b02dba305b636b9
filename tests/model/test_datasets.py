"""Filename label conventions, folder variants, and the weak-label crop source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fprotoseg.model.training.datasets import (
    DatasetError,
    area_cdf,
    draw_weak_crop,
    find_dir,
    image_level_label,
    load_pairs,
    parse_filename_label,
    stratified_holdout,
    weak_images_from_labelled_folder,
    weak_images_from_pairs,
)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("436219-7159-48057-[1, 0, 0].png", [1, 0, 0]),  # WSSS4LUAD
        ("1003370-5631-18822-[0, 1, 1].png", [0, 1, 1]),
        ("TCGA-55-8205-01Z-00-DX1_86720_53260-[1 0 0 1].png", [1, 0, 0, 1]),  # LUAD-HistoSeg
        ("TCGA-A2-A0CM-DX1_xmin18570_ymin40052_MPP-0.2500+0[1101].png", [1, 1, 0, 1]),  # BCSS-WSSS
        ("/some/dir/x-[0 1 0 0].png", [0, 1, 0, 0]),
    ],
)
def test_filename_label_conventions(name: str, expected: list[int]) -> None:
    np.testing.assert_array_equal(parse_filename_label(name), np.asarray(expected, np.float32))


def test_filename_label_errors() -> None:
    with pytest.raises(DatasetError, match=r"no \[\.\.\] label"):
        parse_filename_label("plain.png")
    with pytest.raises(DatasetError, match="0/1"):
        parse_filename_label("a-[1, 2, 0].png")
    with pytest.raises(DatasetError, match="expected 3 labels"):
        parse_filename_label("a[1101].png", num_classes=3)


def test_folder_name_variants(tmp_path: Path) -> None:
    for name in ("training", "valid", "images", "masks"):
        (tmp_path / name).mkdir()
    assert find_dir(tmp_path, "train") == tmp_path / "training"
    assert find_dir(tmp_path, "val") == tmp_path / "valid"
    assert find_dir(tmp_path, "img") == tmp_path / "images"
    assert find_dir(tmp_path, "mask") == tmp_path / "masks"
    assert find_dir(tmp_path, "test") is None


def test_image_level_label_uses_area_fraction() -> None:
    mask = np.full((10, 10), 3)
    mask[:5] = 0  # 50 % tumour
    mask[5, :2] = 1  # 2 % stroma: below a 3 % threshold
    np.testing.assert_array_equal(image_level_label(mask, 3, 0.03), [1, 0, 0])
    np.testing.assert_array_equal(image_level_label(mask, 3, 0.01), [1, 1, 0])


def _write_pair(root: Path, name: str, mask: np.ndarray) -> None:
    (root / "img").mkdir(exist_ok=True)
    (root / "mask").mkdir(exist_ok=True)
    rgb = np.zeros((*mask.shape, 3), np.uint8)
    rgb[mask == 0] = (120, 40, 140)
    rgb[mask == 1] = (230, 150, 190)
    Image.fromarray(rgb).save(root / "img" / name)
    m = Image.fromarray(mask.astype(np.uint8), mode="P")
    m.putpalette([0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255] + [0] * 756)
    m.save(root / "mask" / name)


def test_weak_crops_carry_only_crop_level_labels(tmp_path: Path) -> None:
    mask = np.full((64, 128), 1)
    mask[:, :64] = 0  # left half tumour, right half stroma
    _write_pair(tmp_path, "a.png", mask)
    pairs = load_pairs(tmp_path)
    weak = weak_images_from_pairs(pairs, 3, 0.03)
    np.testing.assert_array_equal(weak[0].label, [1, 1, 0])
    rng = np.random.default_rng(0)
    shapes = [im.shape for im in weak]
    cdf = area_cdf(shapes, 32)
    seen = set()
    for _ in range(60):
        crop, label = draw_weak_crop(rng, shapes, cdf, weak.__getitem__, 32, 3, 0.03)
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
        assert label.shape == (3,) and set(np.unique(label)) <= {0.0, 1.0}
        seen.add(tuple(int(v) for v in label))
    # pure-left crops are tumour-only, pure-right stroma-only, straddling ones both
    assert {(1, 0, 0), (0, 1, 0), (1, 1, 0)} <= seen


def test_labelled_folder_uses_filename_labels(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "p-[0, 1, 0].png")
    imgs = weak_images_from_labelled_folder(tmp_path, 3)
    np.testing.assert_array_equal(imgs[0].label, [0, 1, 0])
    assert imgs[0].crop_label(0, 0, 8, 3, 0.03).tolist() == [0, 1, 0]


def test_wsss4luad_real_pairs_and_holdout(shared_data: Path) -> None:
    pairs = load_pairs(shared_data / "masks" / "wsss4luad" / "test")
    assert len(pairs) == 67
    assert all(p.mask.max() <= 3 for p in pairs)
    held = stratified_holdout(pairs, 3, 20, seed=0)
    assert held == stratified_holdout(pairs, 3, 20, seed=0)  # fixed split
    assert 15 <= len(held) <= 22
    labels = {p.name: image_level_label(p.mask, 3, 0.02) for p in pairs}
    assert any(labels[n][2] == 1 for n in held), "a normal image must be held out"
    assert any(labels[n][2] == 1 for n in labels if n not in held), "and another kept for training"
