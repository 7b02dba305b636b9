"""A small real CNN (random weights by default) used by tests and benchmarks of the pipeline.

It is not a histology model: it exists so the whole-slide path can be exercised and timed with a
real network through the Segmenter seam before (and independently of) trained FProtoSeg weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fprotoseg.model.checkpoint import save_checkpoint
from fprotoseg.model.networks.cam_cnn import conv_blocks
from fprotoseg.model.registry import register


class TinySegNet(nn.Module):
    """Conv stages with stride 2 each; softmax scores at 1/2**n_stages resolution."""

    def __init__(self, num_classes: int, width: int = 32, n_stages: int = 3) -> None:
        super().__init__()
        channels = [width * (2 ** min(i, 2)) for i in range(n_stages)]
        self.features = conv_blocks(channels, [2] * n_stages)
        c_in = channels[-1]
        self.head = nn.Conv2d(c_in, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.features(x)), dim=1)


@register("tiny_cnn")
def _build(config: dict[str, Any], manifest: dict[str, Any]) -> nn.Module:
    return TinySegNet(len(manifest["classes"]), int(config.get("width", 32)), int(config.get("n_stages", 3)))


def write_random_tiny_checkpoint(
    path: str | Path,
    *,
    classes: list[tuple[str, tuple[int, int, int]]] | None = None,
    mpp: float = 1.0,
    tile_size_px: int = 224,
    width: int = 32,
    n_stages: int = 3,
    seed: int = 0,
) -> Path:
    """A real network with seeded random weights, saved as a valid fprotoseg checkpoint."""
    classes = classes or [("Tumor", (200, 0, 0)), ("Stroma", (150, 200, 150)), ("Normal", (0, 120, 255))]
    torch.manual_seed(seed)
    net = TinySegNet(len(classes), width, n_stages)
    manifest = {
        "name": f"tiny-cnn-random-seed{seed}",
        "architecture": "tiny_cnn",
        "config": {"width": width, "n_stages": n_stages},
        "classes": [{"name": n, "color": list(c)} for n, c in classes],
        "mpp": mpp,
        "tile_size_px": tile_size_px,
        "output_stride": 2**n_stages,
        "normalisation": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "training": {"description": "random weights (test/benchmark network, not trained)"},
    }
    return save_checkpoint(path, net.state_dict(), manifest)
