"""The from-scratch CAM network: blocks of plain convolutions and a 1x1 class conv.

Why apart from its trainer (``model/training/cam_cnn.py``: the recipe, the crop sampler, the
training loop): loading a packaged checkpoint rebuilds this network from the manifest, and the
inference API must not import the training code to do it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fprotoseg.model.registry import register

ARCHITECTURE = "cam_cnn"
# Normalisation of a network trained from scratch: centre 0..1 RGB, unit-ish spread.
NORMALISATION = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def conv_blocks(channels: Sequence[int], strides: Sequence[int]) -> nn.Sequential:
    """Blocks of two 3x3 conv + BN + ReLU, the first of each strided (also the tiny test network)."""
    layers: list[nn.Module] = []
    c_in = 3
    for c_out, stride in zip(channels, strides, strict=True):
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
        c_in = c_out
    return nn.Sequential(*layers)


class CamCnn(nn.Module):
    """Blocks of two 3x3 conv + BN + ReLU (the first strided), a 1x1 class conv: the CAM."""

    def __init__(self, num_classes: int, channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        self.features = conv_blocks(channels, strides)
        c_in = channels[-1]
        self.classifier = nn.Conv2d(c_in, num_classes, 1)

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """Class activation logits (N, K, H/stride, W/stride)."""
        return self.classifier(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the CAM's per-cell softmax (argmax = label, max = a confidence)."""
        return torch.softmax(self.cam(x), dim=1)


@register(ARCHITECTURE)
def _build(config: dict[str, Any], manifest: dict[str, Any]) -> nn.Module:
    """The network of a cam_cnn manifest. Its ``config`` is the whole training recipe
    (``training.cam_cnn.manifest_for`` writes every field); only ``channels`` and ``strides``
    shape the network."""
    return CamCnn(len(manifest["classes"]), tuple(config["channels"]), tuple(config["strides"]))

