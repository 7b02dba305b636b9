"""Stage 2 with its own encoder and a background class, and pseudo-mask export with its mIoU.

One tiny stage-1 teacher (MiT-B0 shrunk, random init) is trained on generated tissue-like pairs
for a few steps; stage 2 then trains on an ImageNet EfficientNet-Lite2 with a background output,
and ``fprotoseg pseudo`` (the real CLI) writes and scores the teacher's pseudo masks.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.model.test_train import _tiny_config, _write_generated_pairs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """(data root, stage-1 checkpoint, held-out names): 1 epoch of 8 steps, plain CAM head."""
    from fprotoseg.model.training.train import train

    root = tmp_path_factory.mktemp("s2") / "data"
    names = _write_generated_pairs(root, 12, seed=3)
    cfg = _tiny_config(root, names[:3], epochs=1)
    cfg["cam_head"] = "plain"
    cfg["loss"] = {"level_weights": [0.0, 0.0, 0.0, 1.0], "consistency": 0.0, "alignment": 0.0}
    cfg["inference"] = {"fusion": [0.0, 0.0, 0.0, 1.0]}
    cfg["train"]["iters_per_epoch"] = 8
    out = root.parent / "stage1"
    result = train(cfg, out, device="cpu", progress=False, log=lambda s: None)
    return root, Path(result["checkpoint"]), names[:3]


def test_white_prior_marks_glass_not_pale_tissue_nor_specks() -> None:
    from fprotoseg.model.training.pseudo import white_background

    rgb = np.full((40, 40, 3), (120, 60, 150), np.uint8)  # haematoxylin-purple tissue
    rgb[:, 24:] = 244  # glass
    rgb[5:25, 2:12] = (240, 190, 225)  # pale eosin: bright but pink
    rgb[30, 5] = 250  # a white speck inside tissue (a lumen edge)
    white = white_background(torch.from_numpy(rgb).permute(2, 0, 1)[None].float())[0].numpy()
    assert white[:, 26:].all()
    assert not white[5:25, 2:12].any() and not white[30, 5] and not white[:, :20].any()


def test_rotation_tta_on_a_non_square_input() -> None:
    """Flip + 90-degree rotation TTA maps every view back: same shape as one view, in [0, 1]."""
    from fprotoseg.model.config_schema import network_config
    from fprotoseg.model.networks.fprotoseg import FProtoSegStage1
    from fprotoseg.model.training.pseudo import fused_normalised_cams

    torch.manual_seed(0)
    cfg = {"encoder": {"variant": "b0", "embed_dims": [8, 16, 32, 32], "depths": [1, 1, 1, 1],
                       "num_heads": [1, 1, 2, 2]}, "cam_head": "plain"}  # fmt: skip
    net = FProtoSegStage1(network_config(cfg), 3, torch.zeros(3, 8)).eval()
    x = torch.randn(1, 3, 64, 96)
    cams = fused_normalised_cams(net, x, [0.0, 0.0, 0.0, 1.0], flip_tta=True, rot_tta=True)
    assert cams.shape == (1, 3, 64, 96) and float(cams.min()) >= 0.0 and float(cams.max()) <= 1.0 + 1e-5


def test_stage2_with_its_own_encoder_and_background_trains(
    teacher: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    """Stage 2 on EfficientNet-Lite2 (ImageNet weights) under a MiT-B0 teacher: it trains a few
    steps, predicts K tissue classes + background, is gated by the teacher through the teacher's
    own input normalisation, and scores through `evaluate_checkpoint`."""
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.training.evaluate import evaluate_checkpoint
    from fprotoseg.model.training.train import train

    root, ckpt, holdout = teacher
    cfg = _tiny_config(root, holdout, epochs=1)
    cfg.update(
        stage=2,
        stage2={
            "teacher": str(ckpt),
            "encoder": {
                "variant": "lite2",
                "pretrained": "imagenet",
                "output_stride": 16,
                "frozen_stages": 1,
            },
            "background": True,
            "gate_with_teacher": True,
            "gate_pool": 3,
            "embed_dim": 16,
            "fusion": [0.0, 0.0, 0.0, 1.0],
            "teacher_sees_clean": True,
        },
    )
    cfg["train"].update(iters_per_epoch=3, batch_size=4, lr=1e-3)
    logs: list[str] = []
    result = train(cfg, tmp_path / "run2", device="cpu", progress=False, log=logs.append)
    assert any(line.startswith("pretrained encoder: 0 missing") for line in logs), logs
    seg = load_segmenter(result["checkpoint"], device="cpu")
    manifest = seg.manifest
    assert manifest["architecture"] == "fprotoseg_seg_gated"
    assert manifest["config"]["encoder"]["variant"] == "lite2"
    assert manifest["config"]["stage2"]["teacher_config"]["encoder"]["variant"] == "b0"
    assert manifest["config"]["stage2"]["init_encoder_from_teacher"] is False
    assert manifest["normalisation"]["mean"] == [0.485, 0.456, 0.406]  # the student's (ImageNet)
    assert [c["name"] for c in manifest["classes"]] == ["Tumor", "Stroma", "Normal", "Background"]
    scores = seg.predict(np.zeros((2, 64, 64, 3), np.uint8))
    assert scores.shape == (2, 4, 16, 16) and np.allclose(scores.sum(1), 1.0, atol=1e-5)
    r = evaluate_checkpoint(result["checkpoint"], root, "wsss4luad", holdout)
    assert 0.0 <= r["miou"] <= 1.0 and r["protocol"] == "background_excluded"


def test_stage2_background_targets_come_from_the_white_prior(teacher: tuple[Path, Path, list[str]]) -> None:
    """With stage2.background the pseudo masks hold class K on glass, through the student's
    normalisation (the teacher view undoes it)."""
    from fprotoseg.model.config_schema import as_train_config
    from fprotoseg.model.training.pseudo import make_pseudo_masks
    from fprotoseg.model.training.stage2 import build_stage2

    root, ckpt, holdout = teacher
    cfg = _tiny_config(root, holdout, epochs=1)
    cfg.update(stage=2, stage2={"teacher": str(ckpt), "background": True, "encoder": {"variant": "lite0"}})
    parts = build_stage2(as_train_config(cfg), 3, "cpu", ckpt)
    rgb = np.full((1, 64, 64, 3), (110, 40, 150), np.uint8)
    rgb[:, :, 32:] = 244
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x = (torch.from_numpy(rgb).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    target = make_pseudo_masks(parts.teacher, x, torch.tensor([[1.0, 0.0, 0.0]]), parts.cfg.stage2)
    assert (target[0, :, 36:] == 3).all()  # glass -> background (K = 3)
    assert set(target[0, :, :28].unique().tolist()) <= {0, 255}  # tissue: the labelled class or ignore


def test_pseudo_cli_writes_masks_and_prints_their_miou(
    teacher: tuple[Path, Path, list[str]], tmp_path: Path
) -> None:
    root, ckpt, holdout = teacher
    cfg = _tiny_config(root, holdout, epochs=1)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "pseudo"
    cmd = [sys.executable, "-m", "fprotoseg.app.cli", "pseudo", str(config), "--checkpoint", str(ckpt)]
    cmd += ["--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((out / "pseudo_miou.json").read_text())
    val = report["splits"]["val"]
    assert f"pseudo masks val: mIoU {val['miou']:.4f} on 3 images" in proc.stdout
    assert "pseudo masks train: mIoU" in proc.stdout  # the training pairs have masks too
    assert report["tta"] == "flip_rot" and val["protocol"] == "background_excluded"
    pngs = sorted((out / "val").glob("*.png"))
    assert [p.name for p in pngs] == sorted(holdout) and len(list((out / "train").glob("*.png"))) == 9
    with Image.open(pngs[0]) as im:
        assert im.mode == "P"
        values = set(np.unique(np.asarray(im)).tolist())
    assert values <= {0, 1, 2, 255}
    # the printed figure is the written masks' own score
    from fprotoseg.model.training.datasets import MaskedImage, load_pairs
    from fprotoseg.model.training.evaluate import score_pairs

    def written(p: MaskedImage) -> np.ndarray:
        m = np.asarray(Image.open(out / "val" / p.name)).astype(np.int64)
        m[m == 255] = 3
        return m

    again = score_pairs(load_pairs(root, holdout), written, "wsss4luad", "paper")
    assert again["miou"] == pytest.approx(val["miou"])
