"""The CUDA path: AMP fp16/bf16, channels_last, one training step. Skipped where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fprotoseg.model.checkpoint import save_checkpoint
from fprotoseg.model.fprotoseg import FProtoSegStage1, Stage1Inference, stage1_losses

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CFG = {
    "encoder": {"variant": "b0"},
    "cam_head": "text",
    "text": {"source": "learnable"},
    "loss": {"consistency": 1.0, "alignment": 0.1},
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_one_amp_training_step_channels_last(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    net = FProtoSegStage1(CFG, 3, torch.nn.functional.normalize(torch.randn(3, 384), dim=1)).cuda()
    net = net.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    x = torch.randn(4, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([[1.0, 1.0, 0.0]] * 4, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        out = net(x)
        terms = stage1_losses(
            net, {**out, "logits": [lg.float() for lg in out["logits"]]}, labels, CFG["loss"]
        )
    assert torch.isfinite(terms["total"])
    before = next(net.parameters()).detach().clone()
    opt.zero_grad()
    scaler.scale(terms["total"]).backward()
    scaler.step(opt)
    scaler.update()
    assert not torch.equal(before, next(net.parameters()).detach())


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_inference_through_the_seam_on_cuda(tmp_path: Path, precision: str) -> None:
    from fprotoseg.model import load_segmenter

    module = Stage1Inference(CFG, 3, 384)
    manifest = {
        "architecture": "fprotoseg_cam",
        "config": CFG,
        "mpp": 1.0,
        "tile_size_px": 224,
        "output_stride": 4,
        "classes": [{"name": n, "color": [0, 0, 0]} for n in ("Tumor", "Stroma", "Normal")],
        "text": {"dim": 384},
    }
    path = save_checkpoint(tmp_path / "m.safetensors", module.state_dict(), manifest)
    seg = load_segmenter(path, device="cuda", precision=precision)
    tiles = np.random.default_rng(0).integers(0, 255, (8, 224, 224, 3), dtype=np.uint8)
    scores = seg.predict(tiles)
    ref = load_segmenter(path, device="cpu").predict(tiles)
    assert scores.shape == (8, 3, 56, 56) and np.isfinite(scores).all()
    assert np.abs(scores - ref).max() < 0.05
