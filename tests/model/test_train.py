"""A tiny config trained for a few steps on generated tissue-like images: loss falls, mIoU beats
chance, the best checkpoint loads through the worker's seam, and a run resumes."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fprotoseg.model.training.datasets import load_pairs
from fprotoseg.model.training.evaluate import best_constant

CLASS_RGB = {0: (110, 40, 150), 1: (235, 150, 200), 2: (250, 245, 250)}  # purple, pink, pale


def _write_generated_pairs(root: Path, n: int, seed: int) -> list[str]:
    """Images of two or three textured class regions + palette masks (3 = ignore border)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    names = []
    for i in range(n):
        size = 96
        mask = np.zeros((size, size), np.uint8)
        classes = rng.permutation(3)[: 2 if i % 3 else 3]
        cut = int(rng.integers(24, 72))
        mask[:, :cut] = classes[0]
        mask[:, cut:] = classes[1]
        if len(classes) == 3:
            mask[cut:, :] = classes[2]
        mask[:2] = 3  # a thin ignore band, as in WSSS4LUAD
        rgb = np.zeros((size, size, 3), np.float32)
        for c, col in CLASS_RGB.items():
            rgb[mask == c] = col
        rgb += rng.normal(0, 12, rgb.shape)
        dots = rng.random((size, size)) < 0.08
        rgb[dots & (mask == 0)] *= 0.4  # dark nuclei in "tumour"
        name = f"{i:02d}.png"
        Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(root / "img" / name)
        m = Image.fromarray(mask, mode="P")
        m.putpalette([0, 64, 128, 64, 128, 0, 243, 152, 0, 255, 255, 255] + [0] * 756)
        m.save(root / "mask" / name)
        names.append(name)
    return names


def _tiny_config(root: Path, holdout: list[str], epochs: int) -> dict:
    return {
        "name": "tiny-generated",
        "stage": 1,
        "seed": 0,
        "tile_size_px": 64,
        "data": {
            "dataset": "wsss4luad",
            "pairs_root": str(root),
            "holdout": holdout,
            "crop_px": 48,
            "min_fraction": 0.03,
            "mpp": 1.0,
        },
        "encoder": {
            "variant": "b0",
            "embed_dims": [8, 16, 32, 32],
            "num_heads": [1, 1, 2, 2],
            "depths": [1, 1, 1, 1],
            "drop_path_rate": 0.0,
        },
        "cam_head": "text",
        "text": {"source": "learnable"},
        "prototypes": {"n_sub": 2, "min_px_per_sub": 2},
        "loss": {"level_weights": [0.0, 0.1, 1.0, 1.0], "consistency": 1.0, "alignment": 0.1},
        "train": {
            "epochs": epochs,
            "iters_per_epoch": 12,
            "batch_size": 6,
            "lr": 2e-3,
            "threads": 1,
            "warmup_iters": 5,
        },
    }


def test_tiny_training_learns_and_resumes(tmp_path: Path) -> None:
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.training.train import train

    root = tmp_path / "data"
    names = _write_generated_pairs(root, 24, seed=0)
    holdout = names[:6]
    cfg = _tiny_config(root, holdout, epochs=3)
    out = tmp_path / "run"
    result = train(cfg, out, device="cpu", progress=False, log=lambda s: None)
    with (out / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 and (out / "history.png").is_file()
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    floor = best_constant(load_pairs(root, holdout), "wsss4luad")["miou"]
    assert result["best_miou"] > max(floor, 1 / 3) + 0.1, (result["best_miou"], floor)

    seg = load_segmenter(out / "best.safetensors", device="cpu")
    assert seg.mpp == 1.0 and seg.output_stride == 4 and seg.classes[0].name == "Tumor"
    assert seg.predict(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 3, 16, 16)

    # stage 2: a SegFormer head on pseudo masks of this stage-1 teacher, served the same way
    cfg2 = {
        **_tiny_config(root, holdout, epochs=1),
        "stage": 2,
        "stage2": {
            "teacher": str(out / "best.safetensors"),
            "embed_dim": 16,
            "flip_tta": True,
            "teacher_sees_clean": True,  # the teacher labels the crop before the stain jitter
        },
    }
    cfg2["train"] = {**cfg2["train"], "iters_per_epoch": 4, "colour_jitter": 0.3, "saturation_jitter": 0.3}
    res2 = train(cfg2, tmp_path / "run2", device="cpu", progress=False, log=lambda s: None)
    seg2 = load_segmenter(res2["checkpoint"], device="cpu")
    assert seg2.manifest["architecture"] == "fprotoseg_seg"
    scores = seg2.predict(np.zeros((2, 64, 64, 3), np.uint8))
    assert scores.shape == (2, 3, 16, 16) and np.allclose(scores.sum(1), 1.0, atol=1e-5)

    # resume: one more epoch continues from epoch 3 rather than starting again
    cfg4 = _tiny_config(root, holdout, epochs=4)
    train(cfg4, out, device="cpu", resume=True, progress=False, log=lambda s: None)
    with (out / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]


@pytest.mark.parametrize("variant", ["lite0", "b0"])
def test_tiny_training_per_encoder_loss_falls(tmp_path: Path, variant: str) -> None:
    """Each encoder family trains end to end on generated tissue: the loss falls over a few
    steps, the manifest stores the encoder's own input normalisation, and the served file loads."""
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.training.train import train

    root = tmp_path / "data"
    names = _write_generated_pairs(root, 12, seed=1)
    cfg = _tiny_config(root, names[:3], epochs=3)
    cfg["cam_head"] = "plain"
    cfg["loss"] = {"level_weights": [0.0, 0.0, 0.0, 1.0], "consistency": 0.0, "alignment": 0.0}
    cfg["inference"] = {"fusion": [0.0, 0.0, 0.0, 1.0], "image_logit_weight": 1.0, "image_logit_pool": 3}
    cfg["train"].update(keep="last", hed_jitter=0.05, glass_prob=0.3, val_contexts=["reflect", "glass"])
    if variant.startswith("lite"):
        cfg["encoder"] = {"variant": variant, "output_stride": 16, "frozen_stages": 1}
        cfg["train"]["lr"] = 1e-3
    result = train(cfg, tmp_path / "run", device="cpu", progress=False, log=lambda s: None)
    with (tmp_path / "run" / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    assert all(0.0 <= float(r["val_glass_miou"]) <= 1.0 for r in rows)
    assert all(0.0 <= float(r["val_pseudo_miou"]) <= 1.0 for r in rows)  # stage-1 CAMs as targets
    assert Path(result["checkpoint"]).name == "final.safetensors"
    seg = load_segmenter(result["checkpoint"], device="cpu")
    expected_mean = [0.485, 0.456, 0.406] if variant.startswith("lite") else [0.5, 0.5, 0.5]
    assert seg.manifest["normalisation"]["mean"] == expected_mean
    assert seg.manifest["metrics"]["kept"] == "last" and "heldout_glass" in seg.manifest["metrics"]
    assert seg.predict(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 3, 16, 16)


def test_glass_context_lays_the_crop_on_glass() -> None:
    """``predict_labels(context="glass")`` shows the network the crop on empty glass, offset from
    the tile corner, and returns labels for the crop's own pixels only."""
    from fprotoseg.model.training.evaluate import GLASS_RGB, predict_labels

    seen = []

    def predict(tiles: np.ndarray) -> np.ndarray:
        seen.append(tiles.copy())
        scores = np.zeros((len(tiles), 2, 16, 16), np.float32)
        scores[:, 1] = (tiles[:, ::4, ::4, 0] == GLASS_RGB).astype(np.float32)  # class 1 = glass here
        return scores

    rgb = np.full((40, 70, 3), 100, np.uint8)
    labels = predict_labels(predict, rgb, 64, context="glass", offset_px=8)
    assert labels.shape == (40, 70)
    assert (labels[4:-4, 4:-4] == 0).all()  # the crop is crop, not glass
    tiles = np.concatenate(seen)
    assert (tiles[0, :8] == GLASS_RGB).all() and (tiles[0, 8:48, 8:64] == 100).all()
    reflect = predict_labels(predict, rgb, 64)
    assert reflect.shape == (40, 70) and (reflect == 0).all()


@pytest.mark.parametrize("bad", ["stage: 3", "data: {dataset: nope}"])
def test_bad_configs_are_one_line_errors(tmp_path: Path, bad: str) -> None:
    from fprotoseg.app.cli import main

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(bad + "\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "o"), "--no-progress"]) == 2


def test_stain_jitter_changes_colour_not_geometry() -> None:
    """The clean-teacher stage 2 relies on it: the student's crop is the teacher's crop with
    another tint, pixel for pixel (flips and rotations are applied once, before both)."""
    from fprotoseg.model.training.loader import flip_rotate
    from fprotoseg.model.training.stain import stain_jitter

    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    crops[:, :16] //= 4  # a dark top half: a structure to follow
    geometric = flip_rotate(crops, np.random.default_rng(1))
    jittered = stain_jitter(geometric, np.random.default_rng(2), 0.3, 0.3)
    assert not np.array_equal(jittered, geometric)
    for g, j in zip(geometric, jittered, strict=True):
        corr = np.corrcoef(g.astype(float).mean(2).ravel(), j.astype(float).mean(2).ravel())[0, 1]
        assert corr > 0.9
    assert stain_jitter(geometric, np.random.default_rng(2), 0.0, 0.0) is geometric


def test_keep_best_over_two_contexts_keeps_the_best_mean_epoch(tmp_path: Path) -> None:
    """``keep: best`` with two validation contexts keeps the epoch with the best mean mIoU over
    them, and reports that mean: the score an epoch is compared with is the score it is kept for
    (the trainer once stored the first context's mIoU as the best and compared later epochs'
    means with it, so another epoch than the best could be kept)."""
    from fprotoseg.model.checkpoint import read_checkpoint
    from fprotoseg.model.training.train import train

    root = tmp_path / "data"
    names = _write_generated_pairs(root, 12, seed=2)
    cfg = _tiny_config(root, names[:3], epochs=4)
    cfg["train"].update(iters_per_epoch=3, keep="best", glass_prob=0.3, val_contexts=["reflect", "glass"])
    result = train(cfg, tmp_path / "run", device="cpu", progress=False, log=lambda s: None)
    with (tmp_path / "run" / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    means = [(float(r["val_miou"]) + float(r["val_glass_miou"])) / 2 for r in rows]
    assert len(means) == 4
    assert any(float(r["val_miou"]) != float(r["val_glass_miou"]) for r in rows)  # the contexts differ
    best_epoch = int(np.argmax(means)) + 1  # the first of equal means, as the trainer keeps it
    assert result["best_miou"] == pytest.approx(max(means), abs=1e-9)
    manifest = read_checkpoint(Path(result["checkpoint"]))[1]
    assert manifest["metrics"]["epoch"] == best_epoch and manifest["metrics"]["kept"] == "best"
