"""Stage 2 of the CAM recipe: pseudo masks from the network's own refined map, then pixel training."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fprotoseg.model.training.cam_cnn import (
    PSEUDO_WHITE_MIN,
    CamCnnRecipe,
    CropSampler,
    TrainImage,
    pseudo_masks,
    train,
)
from fprotoseg.model.training.cv import load_units, read_plan
from fprotoseg.model.training.datasets import image_level_label

REPO = Path(__file__).resolve().parents[2]
TINY = CamCnnRecipe(steps=6, batch=4, channels=(8, 8, 16, 16), stage2_steps=4, glass_prob=0.5)


@pytest.fixture(scope="module")
def real_images(shared_data: Path) -> list[TrainImage]:
    units = load_units(read_plan("cv_wsss4luad", shared_data))
    return [u.train_image() for u in units if u.fold == 2][:6]


def test_pixel_targets_follow_the_crop_its_view_and_its_glass() -> None:
    """Two flat halves whose target is their colour's class: whatever crop, rotation, mirror or
    glass band the sampler draws, the target still matches the pixels it lies on."""
    rgb = np.full((160, 160, 3), 60, np.uint8)
    rgb[:, 80:] = 160
    mask = np.zeros((160, 160), np.int64)
    mask[:, 80:] = 1
    target = mask.copy()
    recipe = CamCnnRecipe(batch=64, glass_prob=0.5)
    crops, labels, pixels = CropSampler([TrainImage(rgb, mask=mask)], recipe, 3).pixel_batch(
        np.random.default_rng(0), [target]
    )
    dark, light = crops[..., 0] == 60, crops[..., 0] == 160
    assert (pixels[dark] == 0).all() and (pixels[light] == 1).all()
    glass = ~(dark | light)
    assert glass.any() and (pixels[glass] == 3).all()  # glass takes the ignore index
    assert labels[:, 2].sum() == 0


def test_pseudo_masks_name_only_the_image_label_and_ignore_white(real_images) -> None:
    net = train(real_images, replace(TINY, stage2_steps=0), seed=0)
    targets = pseudo_masks(net, real_images, TINY, 3)
    for im, t in zip(real_images, targets, strict=True):
        assert t.shape == im.rgb.shape[:2]
        assert im.mask is not None
        allowed = set(np.flatnonzero(image_level_label(im.mask, 3, TINY.label_fraction)).tolist()) | {3}
        assert set(np.unique(t).tolist()) <= allowed
        white = im.rgb.min(axis=2) >= PSEUDO_WHITE_MIN
        assert (t[white] == 3).all()
    assert sum(int((t < 3).sum()) for t in targets) > 0.5 * sum(t.size for t in targets)


def test_stage2_continues_from_stage1_and_trains_on_pixels(real_images) -> None:
    kept: list[dict[str, torch.Tensor]] = []
    steps: list[int] = []
    net = train(
        real_images,
        TINY,
        seed=0,
        progress=lambda step, _loss: steps.append(step),
        after_stage1=lambda n: kept.append({k: v.clone() for k, v in n.state_dict().items()}),
    )
    assert steps == list(range(1, TINY.steps + TINY.stage2_steps + 1))
    assert len(kept) == 1
    stage1 = train(real_images, replace(TINY, stage2_steps=0), seed=0)
    # stage 1 is the same run with or without stage 2 (same seed, same draws), stage 2 moves it
    assert all(torch.equal(kept[0][k], v) for k, v in stage1.state_dict().items())
    assert not torch.equal(kept[0]["classifier.weight"], net.state_dict()["classifier.weight"])


@pytest.mark.slow
def test_cv_keeps_both_stages_and_scores_stage1_paired(tmp_path: Path, shared_data: Path) -> None:
    """bench/cv.py keeps each fold's stage-1 network beside the stage-2 one; cv_inference --stage1
    scores it, and refuses runs that kept none."""
    recipe = tmp_path / "s2.yaml"
    # a large stage-2 rate, so that two steps move the network far enough to score differently
    recipe.write_text(
        "name: s2\nsteps: 3\nbatch: 4\nchannels: [8, 8, 16, 16]\nstage2_steps: 2\nstage2_lr: 0.05\n"
    )
    out = tmp_path / "cv"
    cmd = [sys.executable, str(REPO / "bench" / "cv.py"), str(recipe), "--folds", "0,1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [json.loads(line) for line in (out / "cv_wsss4luad.jsonl").read_text().splitlines()]
    assert all(Path(r["stage1_checkpoint"]).is_file() and Path(r["checkpoint"]).is_file() for r in runs)

    from fprotoseg.model.checkpoint import read_checkpoint

    state1, manifest1 = read_checkpoint(Path(runs[0]["stage1_checkpoint"]))
    state2, manifest2 = read_checkpoint(Path(runs[0]["checkpoint"]))
    assert manifest1["config"]["stage2_steps"] == 0 and manifest2["config"]["stage2_steps"] == 2
    assert not all(bool((state1[k] == state2[k]).all()) for k in state1)

    def scored(cv_jsonl: Path, *extra: str) -> dict[str, float]:
        path = tmp_path / f"{cv_jsonl.stem}{''.join(extra)}.json"
        cmd = [sys.executable, str(REPO / "bench" / "cv_inference.py"), str(recipe)]
        cmd += ["--cv", str(cv_jsonl), "--views", "1", "--out", str(path), *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(path.read_text())["views"]["1"]["folds"]

    stage1 = scored(out / "cv_wsss4luad.jsonl", "--stage1")
    assert set(stage1) == {"s0f0", "s0f1"}
    # --stage1 scored the stage-1 file: its fold-0 figure is that file's own, scored directly
    from fprotoseg.model import DEFAULT_CHECKPOINT, load_segmenter
    from fprotoseg.model.training.cv import load_units, miou_present, read_plan, unit_confusion
    from fprotoseg.model.training.evaluate import predict_labels

    seg = load_segmenter(Path(runs[0]["stage1_checkpoint"]), device="cpu")
    cm = np.zeros((3, 3), np.int64)
    for u in load_units(read_plan("cv_wsss4luad", shared_data)):
        if u.fold == runs[0]["fold"] and u.mask is not None:
            cm += unit_confusion(u.mask, predict_labels(seg.predict, u.rgb, seg.tile_size_px), "wsss4luad")
    # (cv_inference keeps float16 scores: a near-tie may fall the other way)
    assert stage1[f"s0f{runs[0]['fold']}"] == pytest.approx(miou_present(cm), abs=2e-3)
    # and it follows the run's stage-1 path, not its final file: name a trained network there
    swapped = tmp_path / "swapped.jsonl"
    named = [{**r, "stage1_checkpoint": str(DEFAULT_CHECKPOINT)} for r in runs]
    swapped.write_text("".join(json.dumps(r) + "\n" for r in named))
    trained, final = scored(swapped, "--stage1"), scored(swapped)
    assert all(trained[key] > final[key] + 0.2 for key in final)

    plain = tmp_path / "plain.yaml"
    plain.write_text("name: s2\nsteps: 3\n")
    for r in runs:
        del r["stage1_checkpoint"]
    (out / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in runs))
    cmd = [sys.executable, str(REPO / "bench" / "cv_inference.py"), str(plain), "--stage1"]
    cmd += ["--cv", str(out / "plain.jsonl"), "--views", "1", "--out", str(tmp_path / "x.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode != 0 and "kept no stage-1 network" in proc.stderr
