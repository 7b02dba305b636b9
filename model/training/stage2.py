"""Stage 2's networks from a config: its own encoder, an optional background class, its teacher.

Why a module of its own: stage 2 used to copy the teacher's encoder config, so a Lite0 stage 1
forced a Lite0 stage 2. Here ``stage2.encoder`` chooses the student's encoder (with ``variant``: a
new one, e.g. Lite2 or MiT-B3, with its own ``pretrained`` weights; without: the teacher's with
those keys changed), ``stage2.background`` adds a background output (index K) trained on the
white-background prior of the pseudo masks, and the frozen teacher is wrapped in a
:class:`TeacherView` that takes the student's input tensors (renormalised for the teacher's
encoder, and turned back into RGB for the white prior).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fprotoseg.model.checkpoint import read_checkpoint
from fprotoseg.model.config_schema import (
    EncoderConfig,
    NetworkConfig,
    Stage2EncoderConfig,
    TrainConfig,
    network_config,
)
from fprotoseg.model.errors import ConfigurationError
from fprotoseg.model.networks.fprotoseg import (
    FProtoSegStage1,
    GatedStage2Inference,
    Renormalise,
    Stage1Inference,
    Stage2Inference,
    encoder_normalisation,
    text_dim,
)

Normalisation = dict[str, list[float]]
BACKGROUND_CLASS = {"name": "Background", "color": [255, 255, 255], "background": True}


class TeacherView(nn.Module):
    """The frozen stage-1 network as stage 2's labeller, fed the student's input tensors.

    ``forward`` renormalises from the student's input normalisation to the teacher's (an identity
    when they agree) and returns the teacher's outputs; ``rgb`` turns the student's input back
    into RGB 0..255 (the white-background prior needs it). ``make_pseudo_masks`` takes it as
    its ``net``.
    """

    def __init__(self, net: FProtoSegStage1, input_norm: Normalisation, teacher_norm: Normalisation) -> None:
        super().__init__()
        self.net = net
        self.renorm = Renormalise(input_norm, teacher_norm)
        self.register_buffer("mean", torch.tensor(input_norm["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(input_norm["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    def rgb(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.float() * self.std + self.mean) * 255.0).clamp(0.0, 255.0)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return self.net(self.renorm(x))


@dataclass
class Teacher:
    """A stage-1 checkpoint loaded for stage 2 or for pseudo-mask export."""

    net: FProtoSegStage1
    config: NetworkConfig
    manifest: dict[str, Any]  # ``manifest["config"]``: the config as the checkpoint records it
    text_record: dict[str, Any]
    normalisation: Normalisation


def load_teacher(path: Path, num_classes: int) -> Teacher:
    """A stage-1 (``fprotoseg_cam``) checkpoint's network, eval mode, on the CPU."""
    state, manifest = read_checkpoint(path)
    if manifest.get("architecture") != "fprotoseg_cam":
        raise ConfigurationError(f"the teacher must be a stage-1 (fprotoseg_cam) checkpoint: {path}")
    t_cfg = network_config(manifest["config"])
    text_record = manifest.get("text", {})
    if len(manifest.get("classes", [])) != num_classes:
        raise ConfigurationError(
            f"{path.name} has {len(manifest.get('classes', []))} classes, the config's dataset {num_classes}"
        )
    module = Stage1Inference(t_cfg, num_classes, text_dim(manifest))
    module.load_state_dict(state)
    norm = manifest.get("normalisation") or encoder_normalisation(t_cfg.encoder)
    return Teacher(module.net.eval(), t_cfg, manifest, text_record, norm)


def student_encoder_config(
    stage2_encoder: Stage2EncoderConfig | None, teacher_encoder: EncoderConfig
) -> EncoderConfig:
    """Stage 2's encoder config: ``stage2.encoder`` with a ``variant`` as it is; without one, the
    teacher's encoder config with those keys changed; absent, the teacher's (as before)."""
    if stage2_encoder is None:
        return teacher_encoder
    own = stage2_encoder.model_dump(exclude_unset=True)
    if stage2_encoder.variant is not None:
        return EncoderConfig.model_validate(own)
    return EncoderConfig.model_validate({**teacher_encoder.model_dump(exclude_unset=True), **own})


def _architecture(enc: EncoderConfig) -> dict[str, Any]:
    return enc.model_dump(exclude={"pretrained"})


@dataclass
class Stage2Parts:
    cfg: TrainConfig  # the run's config as the checkpoint records it (encoder = stage 2's own)
    module: nn.Module  # what the checkpoint serves
    net: nn.Module  # the trained network (module.net)
    teacher: TeacherView  # the frozen labeller, on the device
    arch: str
    text_record: dict[str, Any]


def build_stage2(cfg: TrainConfig, num_classes: int, device: str, teacher_path: Path) -> Stage2Parts:
    """Stage 2's module, its frozen teacher and the resolved config (see the module docstring).

    The returned config has ``encoder`` = stage 2's encoder, ``stage2.init_encoder_from_teacher``
    resolved to a bool (default: true when the encoders' architectures match and
    ``stage2.encoder`` names no ``pretrained`` weights of its own), ``stage2.background`` stated
    and, gated, ``stage2.teacher_config``. The trainer loads ``encoder.pretrained`` when the
    encoder does not come from the teacher.
    """
    s2 = cfg.stage2
    teacher = load_teacher(teacher_path, num_classes)
    t_enc = teacher.config.encoder
    enc = student_encoder_config(s2.encoder, t_enc)
    same = _architecture(enc) == _architecture(t_enc)
    init = s2.init_encoder_from_teacher
    if init is None:
        init = same and (s2.encoder is None or "pretrained" not in s2.encoder.model_fields_set)
    elif init and not same:
        raise ConfigurationError(
            f"stage2.init_encoder_from_teacher: the teacher's encoder ({t_enc.variant}) "
            f"cannot initialise stage 2's ({enc.variant}); set it to false"
        )
    resolved: dict[str, Any] = {"init_encoder_from_teacher": init, "background": s2.background}
    if s2.gate_with_teacher:
        resolved["teacher_config"] = teacher.manifest["config"]
    s2 = s2.model_copy(update=resolved)
    cfg = cfg.model_copy(update={"encoder": enc, "stage2": s2})
    outputs = num_classes + int(s2.background)
    module: GatedStage2Inference | Stage2Inference
    if s2.gate_with_teacher:
        module = GatedStage2Inference(cfg, outputs, text_dim(teacher.manifest))
        module.gate.load_state_dict(teacher.net.state_dict())
        module.gate.requires_grad_(False)
        arch = "fprotoseg_seg_gated"
    else:
        module = Stage2Inference(cfg, outputs)
        arch = "fprotoseg_seg"
    net = module.net
    if init:
        net.encoder.load_state_dict(teacher.net.encoder.state_dict())
    view = TeacherView(teacher.net, encoder_normalisation(enc), teacher.normalisation).to(device).eval()
    return Stage2Parts(cfg, module, net, view, arch, teacher.text_record)


def class_entries(classes: list[dict[str, Any]], cfg: NetworkConfig) -> list[dict[str, Any]]:
    """The manifest's classes: the dataset's, plus Background last for a stage-2 network with
    ``stage2.background`` (the service then shows where the network says "not tissue")."""
    if cfg.stage == 2 and cfg.stage2.background:
        return [*classes, dict(BACKGROUND_CLASS)]
    return classes
