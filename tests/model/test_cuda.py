"""The CUDA path: AMP fp16/bf16, channels_last, one training step. Skipped where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fprotoseg.model.checkpoint import save_checkpoint
from fprotoseg.model.config_schema import network_config
from fprotoseg.model.networks.fprotoseg import FProtoSegStage1, Stage1Inference, stage1_losses

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CFG_DICT = {
    "encoder": {"variant": "b0"},
    "cam_head": "text",
    "text": {"source": "learnable"},
    "loss": {"consistency": 1.0, "alignment": 0.1},
}
CFG = network_config(CFG_DICT)


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
            net, {**out, "logits": [lg.float() for lg in out["logits"]]}, labels, CFG.loss
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
        "config": CFG_DICT,
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


def _tiny_cuda_segmenter(tmp_path: Path, precision: str):
    from fprotoseg.model import load_segmenter

    module = Stage1Inference(CFG, 3, 384)
    manifest = {
        "architecture": "fprotoseg_cam",
        "config": CFG_DICT,
        "mpp": 1.0,
        "tile_size_px": 224,
        "output_stride": 4,
        "classes": [{"name": n, "color": [0, 0, 0]} for n in ("Tumor", "Stroma", "Normal")],
        "text": {"dim": 384},
    }
    path = save_checkpoint(tmp_path / "m.safetensors", module.state_dict(), manifest)
    return load_segmenter(path, device="cuda", precision=precision)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_streaming_seam_pinned_buffers_and_overlapped_batches(tmp_path: Path, precision: str) -> None:
    """Pinned host buffers, two batches in flight (the second uploaded while the first runs),
    scores copied back asynchronously into pinned memory: equal to plain predict."""
    seg = _tiny_cuda_segmenter(tmp_path, precision)
    tiles_a = seg.host_buffer((8, 224, 224, 3), np.uint8)
    tiles_b = seg.host_buffer((8, 224, 224, 3), np.uint8)
    scores_a = seg.host_buffer((8, 3, 56, 56), np.float32)
    scores_b = seg.host_buffer((8, 3, 56, 56), np.float32)
    assert seg._host_tensor(tiles_a).is_pinned() and seg._host_tensor(scores_b).is_pinned()
    rng = np.random.default_rng(0)
    tiles_a[:] = rng.integers(0, 255, tiles_a.shape, dtype=np.uint8)
    tiles_b[:] = rng.integers(0, 255, tiles_b.shape, dtype=np.uint8)
    pending_a = seg.submit(tiles_a[:8], scores_a)
    pending_b = seg.submit(tiles_b[:5], scores_b)  # queued before a's scores are taken
    got_a, got_b = pending_a.result(), pending_b.result()
    assert got_a.shape == (8, 3, 56, 56) and got_b.shape == (5, 3, 56, 56)
    assert np.shares_memory(got_b, scores_b)
    np.testing.assert_allclose(got_a, seg.predict(tiles_a), atol=0.02)
    np.testing.assert_allclose(got_b, seg.predict(tiles_b[:5]), atol=0.02)


def test_batch_size_from_free_device_memory(tmp_path: Path) -> None:
    seg = _tiny_cuda_segmenter(tmp_path, "fp16")
    batch = seg.suggest_batch_size()
    assert 8 <= batch <= 256 and batch % 8 == 0
    free, _ = torch.cuda.mem_get_info()
    tiles = np.zeros((batch, 224, 224, 3), dtype=np.uint8)
    assert seg.predict(tiles).shape[0] == batch  # the suggested batch fits
    assert torch.cuda.max_memory_allocated() < free + torch.cuda.memory_reserved()


def test_pipeline_on_cuda_with_the_batch_chosen_by_the_device(tmp_path: Path, shared_data: Path) -> None:
    from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
    from tests.stubs import render_known_slide_rgb, write_pyramid_tiff

    rgb, _ = render_known_slide_rgb(shared_data / "patches", 1.0)
    slide = write_pyramid_tiff(tmp_path / "known.tiff", rgb, 1.0, 2)
    seg = _tiny_cuda_segmenter(tmp_path, "fp16")
    result = run(slide, tmp_path / "out", seg, options=PipelineOptions())
    assert result.provenance["options"]["batch_size"] == seg.suggest_batch_size()
    assert result.provenance["model"]["device"] == "cuda"
    assert result.stats["tissue_area_um2"] > 0
