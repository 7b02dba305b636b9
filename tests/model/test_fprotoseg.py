"""Prototype maths, losses, pseudo masks, the registered inference modules and checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fprotoseg.model.checkpoint import save_checkpoint
from fprotoseg.model.config_schema import PseudoMaskConfig, network_config
from fprotoseg.model.errors import CheckpointError
from fprotoseg.model.networks.fprotoseg import (
    FProtoSegStage1,
    Stage1Inference,
    Stage2Inference,
    instance_cam,
    kmeans_assign,
    masked_mean,
    normalise_cam,
    stage1_losses,
    structure_aware_prototypes,
    text_alignment_loss,
)
from fprotoseg.model.training.pseudo import IGNORE_INDEX, make_pseudo_masks, pseudo_masks

TINY_ENCODER = {
    "variant": "b0",
    "embed_dims": [8, 16, 24, 32],
    "num_heads": [1, 1, 1, 2],
    "depths": [1, 1, 1, 1],
}
TINY_DICT = {
    "encoder": TINY_ENCODER,
    "cam_head": "text",
    "text": {"source": "learnable"},
    "prototypes": {"levels": [1, 2, 3], "n_sub": 2, "min_px_per_sub": 2},
    "loss": {"consistency": 1.0, "alignment": 0.1},
}
TINY_CFG = network_config(TINY_DICT)
CLASSES = [
    {"name": "Tumor", "color": [200, 0, 0]},
    {"name": "Stroma", "color": [150, 200, 150]},
    {"name": "Normal", "color": [0, 120, 255]},
]


def _text(k: int = 3, d: int = 16) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(0)), dim=1)


def test_prototype_is_the_masked_mean() -> None:
    feats = torch.arange(12, dtype=torch.float32).reshape(2, 6)  # C=2, P=6
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]], dtype=torch.float32)
    protos = masked_mean(feats, mask)
    torch.testing.assert_close(protos, torch.tensor([[0.5, 6.5], [4.5, 10.5]]))


def test_instance_cam_is_in_unit_range_and_peaks_on_its_prototype() -> None:
    feats = torch.nn.functional.normalize(torch.randn(8, 50), dim=0)
    protos = feats[:, [3, 7, 20]].t()
    owners = torch.tensor([0, 0, 1])
    cam = instance_cam(feats, protos, owners, 2)
    assert cam.shape == (2, 50)
    assert float(cam.min()) >= 0.0 and float(cam.max()) <= 1.0
    assert cam[0, 3] == pytest.approx(1.0, abs=1e-5) and cam[1, 20] == pytest.approx(1.0, abs=1e-5)


def test_kmeans_separates_two_clusters() -> None:
    a = torch.tensor([1.0, 0.0]) + 0.01 * torch.randn(10, 2)
    b = torch.tensor([0.0, 1.0]) + 0.01 * torch.randn(10, 2)
    labels = kmeans_assign(torch.cat([a, b]), 2)
    assert len(set(labels[:10].tolist())) == 1 and len(set(labels[10:].tolist())) == 1
    assert labels[0] != labels[10]


def test_normalise_cam_is_min_max_per_channel() -> None:
    cam = torch.tensor([[[[-1.0, 0.0], [1.0, 3.0]]]])
    out = normalise_cam(cam)
    assert float(out.min()) == 0.0 and float(out.max()) == pytest.approx(1.0, abs=1e-4)


def test_stage1_losses_are_finite_with_gradients() -> None:
    torch.manual_seed(0)
    net = FProtoSegStage1(TINY_CFG, 3, _text())
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    out = net(x)
    assert [c.shape[-1] for c in out["cams"]] == [16, 8, 4, 4]  # strides 4, 8, 16, 16
    terms = stage1_losses(net, out, labels, TINY_CFG.loss)
    assert set(terms) == {"cls", "consistency", "alignment", "total"}
    assert all(torch.isfinite(v) for v in terms.values())
    terms["total"].backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert net.align_proj[0].weight.grad is not None and net.align_proj[0].weight.grad.abs().sum() > 0
    assert net.cam_head.scales.grad is not None


def test_structure_aware_prototypes_one_owner_per_present_class_or_background() -> None:
    torch.manual_seed(0)
    net = FProtoSegStage1(TINY_CFG, 3, _text())
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    out = net(torch.randn(1, 3, 64, 64))
    po = structure_aware_prototypes(out["feats"], out["cams"], labels, TINY_CFG.prototypes)
    owners = set(po.owners[0].tolist())
    assert owners <= {-1, 0, 2}  # background, tumour, normal: never the absent stroma
    assert po.protos[0].shape[1] == sum(TINY_ENCODER["embed_dims"][i] for i in (1, 2, 3))


def test_text_alignment_prefers_own_class_text() -> None:
    text = torch.eye(3)
    proj = torch.nn.Identity()
    aligned = text_alignment_loss([torch.eye(3)], [torch.tensor([0, 1, 2])], proj, text)
    crossed = text_alignment_loss([torch.eye(3)], [torch.tensor([1, 2, 0])], proj, text)
    assert float(aligned) < 0.01 < float(crossed)


def test_pseudo_mask_shapes_and_background() -> None:
    cams = torch.zeros(2, 3, 8, 8)
    cams[:, 0, :4] = 1.0
    cams[:, 1, 4:] = 0.95
    labels = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    masks = pseudo_masks(cams, labels, bg_power=10.0)
    assert masks.shape == (2, 8, 8) and masks.dtype == torch.int64
    assert (masks[0, :4] == 0).all() and (masks[0, 4:] == 1).all()
    assert (masks[1, 4:] == IGNORE_INDEX).all()  # stroma gated off -> background wins -> ignore
    torch.manual_seed(0)
    net = FProtoSegStage1(TINY_CFG, 3, _text())
    m = make_pseudo_masks(net, torch.randn(2, 3, 64, 64), labels, PseudoMaskConfig(flip_tta=True))
    assert m.shape == (2, 64, 64)
    assert set(torch.unique(m).tolist()) <= {0, 1, IGNORE_INDEX}  # only labelled classes appear


def _manifest(arch: str) -> dict:
    return {
        "architecture": arch,
        "config": TINY_DICT,
        "classes": CLASSES,
        "mpp": 1.0,
        "tile_size_px": 64,
        "output_stride": 4,
        "normalisation": {"mean": [0.5] * 3, "std": [0.5] * 3},
        "text": {"dim": 16},
    }


@pytest.mark.parametrize("arch", ["fprotoseg_cam", "fprotoseg_seg"])
def test_checkpoint_round_trip_through_load_segmenter(tmp_path: Path, arch: str) -> None:
    from fprotoseg.model import load_segmenter

    torch.manual_seed(0)
    module = Stage1Inference(TINY_CFG, 3, 16) if arch == "fprotoseg_cam" else Stage2Inference(TINY_CFG, 3)
    module.eval()
    path = save_checkpoint(tmp_path / "m.safetensors", module.state_dict(), _manifest(arch))
    seg = load_segmenter(path, device="cpu")
    tiles = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    scores = seg.predict(tiles)
    assert scores.shape == (2, 3, 16, 16) and scores.dtype == np.float32
    assert scores.min() >= 0.0 and scores.max() <= 1.0
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-5)
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        np.testing.assert_allclose(module(x).numpy(), scores, atol=1e-4)
    assert [c.name for c in seg.classes] == ["Tumor", "Stroma", "Normal"]


def test_bf16_autocast_inference_on_cpu(tmp_path: Path) -> None:
    from fprotoseg.model import load_segmenter

    module = Stage1Inference(TINY_CFG, 3, 16)
    path = save_checkpoint(tmp_path / "m.safetensors", module.state_dict(), _manifest("fprotoseg_cam"))
    tiles = np.random.default_rng(1).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    fp32 = load_segmenter(path, device="cpu", precision="fp32").predict(tiles)
    bf16 = load_segmenter(path, device="cpu", precision="bf16").predict(tiles)
    assert bf16.dtype == np.float32 and bf16.shape == fp32.shape
    assert np.isfinite(bf16).all()
    assert np.abs(bf16 - fp32).max() < 0.1


def test_corrupted_and_foreign_files_are_checkpoint_errors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from fprotoseg.model import load_segmenter

    module = Stage1Inference(TINY_CFG, 3, 16)
    good = save_checkpoint(tmp_path / "m.safetensors", module.state_dict(), _manifest("fprotoseg_cam"))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:1000])
    garbage = tmp_path / "slide.safetensors"
    garbage.write_bytes(b"II*\x00" + b"\x00" * 200)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    wrong_arch = save_checkpoint(
        tmp_path / "wrong.safetensors", {"w": torch.zeros(2)}, _manifest("fprotoseg_cam")
    )
    for path, pattern in [
        (truncated, "not a readable"),
        (garbage, "not a readable"),
        (foreign, "not a fprotoseg checkpoint"),
        (wrong_arch, "do not match"),
        (tmp_path / "missing.safetensors", "not found"),
    ]:
        with pytest.raises(CheckpointError, match=pattern):
            load_segmenter(path, device="cpu")


def test_gated_stage2_vetoes_classes_the_tile_score_rules_out(tmp_path: Path) -> None:
    """The gated stage-2 module adds the teacher's tile logits to the stage-2 logits: weight 0 is
    plain stage 2, a dominant weight makes the tile's verdict win every pixel; the module survives
    a checkpoint round trip stored in fp16."""
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.networks.fprotoseg import GatedStage2Inference

    torch.manual_seed(0)
    cfg = {**TINY_DICT, "stage2": {"teacher_config": TINY_DICT, "gate_weight": 0.0, "embed_dim": 16}}
    module = GatedStage2Inference(network_config(cfg), 3, 16).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), torch.softmax(module.net(x), dim=1))
        # a teacher that is sure tile 0 holds class 2 only and tile 1 class 0 only
        verdict = torch.tensor([[-20.0, -20.0, 20.0], [20.0, -20.0, -20.0]])
        real_gate_forward = module.gate.forward
        module.gate.forward = lambda inp: {"cams": [verdict[:, :, None, None]]}
        module.gate_weight = 1.0
        labels = module(x).argmax(1)
        module.gate.forward = real_gate_forward
        assert (labels[0] == 2).all() and (labels[1] == 0).all()
    module.gate_weight = 1.0
    manifest = {
        **_manifest("fprotoseg_seg_gated"),
        "config": {**cfg, "stage2": {**cfg["stage2"], "gate_weight": 1.0}},
    }
    state = {k: v.half() if v.is_floating_point() else v for k, v in module.state_dict().items()}
    seg = load_segmenter(save_checkpoint(tmp_path / "g.safetensors", state, manifest), device="cpu")
    tiles = np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8)
    scores = seg.predict(tiles)
    assert scores.shape == (2, 3, 16, 16) and np.isfinite(scores).all()
    np.testing.assert_allclose(scores.sum(1), 1.0, atol=1e-4)
    xin = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5
    with torch.no_grad():
        np.testing.assert_allclose(module(xin).numpy(), scores, atol=2e-2)  # fp16 storage
