"""FProtoSeg networks: the stage-1 text-prototype CAM network and the stage-2 segmentation network.

Provenance (the paper, Ding et al., Pattern Recognition 175, 2026, has no public code):

- MiT encoder, strides 4,2,2,1: published SegFormer code (see ``model/networks/mit.py``).
- Multi-level text-prototype CAMs (per-level MLP from class text embeddings, learnable scale
  initialised at 1/0.07 and not exponentiated, cosine to normalised pixel features, GAP class
  scores, BCE per level 0/0.1/1/1): follows TPRO (MICCAI 2023) and PBIP (CVPR 2025) code.
- Structure-aware prototype modeling: RECONSTRUCTION from the abstract on the image-specific
  prototypes of SIPE (CVPR 2022): per image, per present class and background, prototypes are
  masked means of hierarchical features over seeds refined by a feature-affinity random walk,
  with several sub-prototypes per class (k-means in the seed) for rare morphologies; instance CAM
  = max cosine to a class's sub-prototypes; L1 consistency with the global CAM.
- Text-aware prototype alignment: RECONSTRUCTION: instance prototypes are projected into text
  space and aligned one-to-one with their own class text by a per-sample InfoNCE (tau 0.07).
- Stage 2: SegFormer all-MLP head (published SegFormer code) trained on pseudo masks.

Inference modules registered for checkpoints (forward: normalised NCHW -> (N, K, H/4, W/4) in
[0, 1], K = tissue classes; a stage-2 network trained with ``stage2.background`` has one more
channel, background, last, and its manifest lists a Background class last):

- ``fprotoseg_cam``: stage 1; softmax over classes of the level-fused CAM logits.
- ``fprotoseg_seg``: stage 2; softmax of the SegFormer head.
- ``fprotoseg_seg_gated``: stage 2 plus the frozen stage-1 teacher's tile-level class logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fprotoseg.model.config_schema import (
    MIT_OPTIONS,
    EncoderConfig,
    LossConfig,
    NetworkConfig,
    PrototypesConfig,
    network_config,
)
from fprotoseg.model.networks.efficientnet import IMAGENET_NORMALISATION, LITE_VARIANTS, EfficientNetLite
from fprotoseg.model.networks.mit import MixTransformer, mit_config
from fprotoseg.model.registry import register

OUTPUT_STRIDE = 4
HALF_NORMALISATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}


def build_encoder(enc: EncoderConfig) -> nn.Module:
    """MiT-B0..B3 (``variant: b0``) or EfficientNet-Lite0..2 (``variant: lite0``) from the config.

    Both return four feature levels and expose ``out_channels``; ``pretrained`` is read by the
    trainer (weights load once, before training), never here (inference needs no weight file).
    The schema has already refused the options of the other family.
    """
    variant = enc.variant or "b0"
    if variant in LITE_VARIANTS:
        return EfficientNetLite(variant, enc.output_stride or 32, enc.frozen_stages or 0)
    return MixTransformer(mit_config(variant, **{k: getattr(enc, k) for k in MIT_OPTIONS}))


def encoder_normalisation(enc: EncoderConfig) -> dict[str, list[float]]:
    """The input normalisation an encoder expects: ImageNet statistics for ImageNet weights,
    0.5/0.5 for MiT trained from scratch (what the first checkpoints used). Stored in the manifest."""
    if (enc.variant or "b0") in LITE_VARIANTS or enc.pretrained:
        return IMAGENET_NORMALISATION
    return HALF_NORMALISATION


# --------------------------------------------------------------------------------------------
# Stage 1: multi-level (text-)prototype CAMs
# --------------------------------------------------------------------------------------------


class CamHead(nn.Module):
    """Per-level class activation maps.

    ``text`` (TPRO): prototypes = MLP_l(text embeddings); CAM = scale_l * cos(pixel, prototype).
    ``plain``: a bias-free 1x1 conv per level (the classic CAM classifier, no text, no cosine).
    """

    def __init__(self, mode: str, channels: tuple[int, ...], text_dim: int, num_classes: int) -> None:
        super().__init__()
        if mode not in ("text", "plain"):
            raise ValueError(f"cam head mode must be text or plain, got {mode!r}")
        self.mode = mode
        if mode == "text":
            self.mlps = nn.ModuleList(
                nn.Sequential(nn.Linear(text_dim, text_dim), nn.GELU(), nn.Linear(text_dim, c))
                for c in channels
            )
            self.scales = nn.Parameter(torch.full((len(channels),), 1.0 / 0.07))
        else:
            self.convs = nn.ModuleList(nn.Conv2d(c, num_classes, 1, bias=False) for c in channels)

    def prototypes(self, text: torch.Tensor) -> list[torch.Tensor]:
        return [mlp(text) for mlp in self.mlps]

    def forward(self, feats: list[torch.Tensor], text: torch.Tensor) -> list[torch.Tensor]:
        if self.mode == "plain":
            return [conv(f) for conv, f in zip(self.convs, feats, strict=True)]
        cams = []
        for i, (f, proto) in enumerate(zip(feats, self.prototypes(text), strict=True)):
            cos = torch.einsum("nchw,kc->nkhw", F.normalize(f, dim=1), F.normalize(proto, dim=1))
            cams.append(self.scales[i] * cos)
        return cams


def fuse_levels(maps: list[torch.Tensor], weights: list[float], size: tuple[int, int]) -> torch.Tensor:
    """Weighted sum of per-level maps resized (bilinear) to ``size``; zero-weight levels skipped."""
    out = None
    for m, w in zip(maps, weights, strict=True):
        if w == 0:
            continue
        r = F.interpolate(m, size=size, mode="bilinear", align_corners=False) * w
        out = r if out is None else out + r
    if out is None:
        raise ValueError("all level fusion weights are zero")
    return out


class FProtoSegStage1(nn.Module):
    """Encoder + CAM head + the projection used by text-aware prototype alignment."""

    def __init__(self, cfg: NetworkConfig, num_classes: int, text_embeddings: torch.Tensor) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.encoder = build_encoder(cfg.encoder)
        channels = self.encoder.out_channels
        text_dim = int(text_embeddings.shape[1])
        if cfg.text.source == "learnable":
            self.text_embeddings = nn.Parameter(text_embeddings.clone())
        else:
            self.register_buffer("text_embeddings", text_embeddings.clone())
        self.cam_head = CamHead(cfg.cam_head, channels, text_dim, num_classes)
        self.proto_levels = list(cfg.prototypes.levels)
        fused_dim = sum(channels[i] for i in self.proto_levels)
        self.align_proj = nn.Sequential(
            nn.Linear(fused_dim, text_dim), nn.GELU(), nn.Linear(text_dim, text_dim)
        )

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        feats = self.encoder(x)
        cams = self.cam_head(feats, self.text_embeddings)
        logits = [c.mean(dim=(2, 3)) for c in cams]
        return {"feats": feats, "cams": cams, "logits": logits}


def normalise_cam(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """ReLU then per-image, per-channel min-max to [0, 1] (the pseudo-mask normalisation)."""
    cam = F.relu(cam)
    flat = cam.flatten(2)
    lo = flat.min(dim=2, keepdim=True).values.unsqueeze(-1)
    hi = flat.max(dim=2, keepdim=True).values.unsqueeze(-1)
    return (cam - lo) / (hi - lo + eps)


def masked_mean(feats: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Prototype = mean feature over the mask. feats (C, P), mask (M, P) weights -> (M, C)."""
    return (mask @ feats.t()) / (mask.sum(dim=1, keepdim=True) + eps)


def instance_cam(
    feats_unit: torch.Tensor, protos: torch.Tensor, owners: torch.Tensor, n_groups: int
) -> torch.Tensor:
    """Instance CAM per group: max over the group's prototypes of ReLU(cosine). Values in [0, 1].

    feats_unit (C, P) unit columns; protos (M, C); owners (M,) group index of each prototype.
    """
    sim = F.relu(F.normalize(protos, dim=1) @ feats_unit)  # (M, P)
    out = feats_unit.new_zeros((n_groups, feats_unit.shape[1]))
    for g in range(n_groups):
        sel = owners == g
        if sel.any():
            out[g] = sim[sel].max(dim=0).values
    return out.clamp(0.0, 1.0)


def kmeans_assign(x: torch.Tensor, k: int, iters: int = 5) -> torch.Tensor:
    """Cosine k-means on rows of x (P, C) with farthest-point init; returns labels (P,). No grad."""
    x = F.normalize(x, dim=1)
    centres = [x[0]]
    for _ in range(1, k):
        sim = torch.stack([x @ c for c in centres]).max(dim=0).values
        centres.append(x[int(sim.argmin())])
    c = torch.stack(centres)
    for _ in range(iters):
        labels = (x @ c.t()).argmax(dim=1)
        for j in range(k):
            sel = labels == j
            if sel.any():
                c[j] = F.normalize(x[sel].mean(0), dim=0)
    return (x @ c.t()).argmax(dim=1)


@dataclass
class PrototypeOutputs:
    """Per-batch products of structure-aware prototype modeling."""

    consistency: torch.Tensor  # scalar L1 loss
    protos: list[torch.Tensor]  # per image: (M, C) instance (sub-)prototypes with grad
    owners: list[torch.Tensor]  # per image: (M,) class index of each prototype (-1 = background)


def structure_aware_prototypes(
    feats: list[torch.Tensor],
    cams: list[torch.Tensor],
    labels: torch.Tensor,
    cfg: PrototypesConfig,
) -> PrototypeOutputs:
    """RECONSTRUCTION of FProtoSeg's structure-aware prototype modeling (on SIPE's scaffold).

    1. Hierarchical features: chosen levels resized to the finest chosen level, each L2-normalised,
       concatenated.
    2. Seeds: the level-fused global CAM, normalised and gated by the image labels, background
       (1 - max)^k; refined by a random walk on the feature affinity (relu(cos)^beta, row-normalised);
       seed = argmax over background + present classes. Seeds are detached.
    3. Prototypes: per present class, k-means the seed into up to ``n_sub`` clusters (rare
       morphologies get their own prototype); each sub-prototype is a masked mean (with grad).
    4. Instance CAM = max cosine to the class's sub-prototypes; L1 consistency with the global CAM.
    """
    levels, fusion, bg_power = cfg.levels, cfg.fusion, cfg.bg_power
    beta, walk_steps, n_sub, min_px = cfg.affinity_beta, cfg.walk_steps, cfg.n_sub, cfg.min_px_per_sub

    size = feats[levels[0]].shape[-2:]
    hier = torch.cat(
        [
            F.normalize(F.interpolate(feats[i], size=size, mode="bilinear", align_corners=False), dim=1)
            for i in levels
        ],
        dim=1,
    )  # (N, C, h, w)
    gcam = normalise_cam(fuse_levels(cams, fusion, size)) * labels[:, :, None, None]
    bg = (1.0 - gcam.max(dim=1, keepdim=True).values).clamp(min=0.0) ** bg_power
    gcam_bg = torch.cat([bg, gcam], dim=1)  # (N, 1+K, h, w), channel 0 = background

    n, c, h, w = hier.shape
    losses, protos_out, owners_out = [], [], []
    for b in range(n):
        fb = hier[b].reshape(c, h * w)
        fb_unit = F.normalize(fb, dim=0)
        with torch.no_grad():
            aff = F.relu(fb_unit.t() @ fb_unit) ** beta
            aff = aff / aff.sum(dim=1, keepdim=True).clamp(min=1e-6)
            score = gcam_bg[b].reshape(1 + labels.shape[1], h * w).detach()
            for _ in range(walk_steps):
                score = score @ aff.t()
            present = torch.cat([labels.new_ones(1), labels[b]]) > 0
            score[~present] = -1.0
            seed = score.argmax(dim=0)  # (P,) in 0..K (0 = background)
        protos, owners = [], []
        for g in torch.nonzero(present).flatten().tolist():
            sel = seed == g
            count = int(sel.sum())
            if count == 0:
                continue
            k = max(1, min(n_sub, count // min_px))
            if k > 1:
                with torch.no_grad():
                    sub = kmeans_assign(fb[:, sel].t().detach(), k)
                idx = torch.nonzero(sel).flatten()
                for j in range(k):
                    m = torch.zeros(h * w, device=fb.device, dtype=fb.dtype)
                    m[idx[sub == j]] = 1.0
                    if m.sum() > 0:
                        protos.append(masked_mean(fb, m[None])[0])
                        owners.append(g - 1)
            else:
                protos.append(masked_mean(fb, sel.to(fb.dtype)[None])[0])
                owners.append(g - 1)
        if not protos:
            continue
        p = torch.stack(protos)
        o = torch.tensor(owners, device=fb.device)
        groups = torch.nonzero(present).flatten()
        icam = instance_cam(fb_unit, p, o + 1, 1 + labels.shape[1])  # index by group (bg = 0)
        target = gcam_bg[b].reshape(1 + labels.shape[1], h * w)
        losses.append((icam[groups] - target[groups]).abs().mean())
        protos_out.append(p)
        owners_out.append(o)
    consistency = torch.stack(losses).mean() if losses else hier.sum() * 0.0
    return PrototypeOutputs(consistency, protos_out, owners_out)


def text_alignment_loss(
    protos: list[torch.Tensor],
    owners: list[torch.Tensor],
    proj: nn.Module,
    text: torch.Tensor,
    tau: float = 0.07,
) -> torch.Tensor:
    """RECONSTRUCTION of text-aware prototype alignment: per-sample InfoNCE, one-to-one.

    Each instance (sub-)prototype of a tissue class, projected into text space, must be closer to
    its own class text than to every other class text (temperature ``tau``). Background
    prototypes have no text and are left out. Averaged per image, then over the batch.
    """
    text_unit = F.normalize(text, dim=1)
    per_image = []
    for p, o in zip(protos, owners, strict=True):
        keep = o >= 0
        if not keep.any():
            continue
        z = F.normalize(proj(p[keep]), dim=1)
        per_image.append(F.cross_entropy(z @ text_unit.t() / tau, o[keep]))
    if not per_image:
        return text.sum() * 0.0
    return torch.stack(per_image).mean()


def partial_bce(logits: torch.Tensor, targets: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """BCE averaged over the known entries only: a dataset that says "tumour present, normal
    absent" and nothing about stroma (LC25000) must not teach "no stroma"."""
    per = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * known
    return per.sum() / known.sum().clamp(min=1.0)


def stage1_losses(
    net: FProtoSegStage1, out: dict[str, Any], labels: torch.Tensor, loss_cfg: LossConfig
) -> dict[str, torch.Tensor]:
    """All stage-1 losses with their configured weights; ``total`` is what gets back-propagated."""
    level_w = loss_cfg.level_weights
    known = (labels >= 0).to(out["logits"][-1].dtype)  # partial labels: -1 = unknown, no loss
    targets = labels.clamp(min=0.0)
    cls = sum(
        w * partial_bce(lg, targets, known) for w, lg in zip(level_w, out["logits"], strict=True) if w
    )
    terms: dict[str, torch.Tensor] = {"cls": cls}
    total = cls
    w_cons, w_align = loss_cfg.consistency, loss_cfg.alignment
    if w_cons > 0 or w_align > 0:
        maybe_present = (labels != 0).to(labels.dtype)  # unknown (-1) may be present: not gated out
        po = structure_aware_prototypes(out["feats"], out["cams"], maybe_present, net.cfg.prototypes)
        terms["consistency"] = po.consistency
        total = total + w_cons * po.consistency
        if w_align > 0:
            align = text_alignment_loss(
                po.protos, po.owners, net.align_proj, net.text_embeddings, loss_cfg.alignment_tau
            )
            terms["alignment"] = align
            total = total + w_align * align
    terms["total"] = total
    return terms


def tile_class_logits(cam: torch.Tensor, pool_cells: int, size: tuple[int, int]) -> torch.Tensor:
    """The network's class verdict around each pixel, added to its logits at inference.

    ``pool_cells`` 0: one verdict per tile (GAP, as trained); that breaks on a slide where a tile
    straddles different tissue (or glass), so ``pool_cells`` k > 0 averages the CAM logits over a
    k x k window of feature cells instead (zero padding not counted): the verdict then depends on
    the neighbourhood only, the same in a crop and in a slide.
    """
    if pool_cells <= 0:
        return cam.float().mean(dim=(2, 3))[:, :, None, None]
    local = F.avg_pool2d(
        cam.float(), pool_cells, stride=1, padding=pool_cells // 2, count_include_pad=False
    )[..., : cam.shape[-2], : cam.shape[-1]]
    return F.interpolate(local, size=size, mode="bilinear", align_corners=False)


class Stage1Inference(nn.Module):
    """What the service runs for a stage-1 checkpoint: fused CAM logits -> softmax at stride 4.

    ``inference.image_logit_weight`` adds the tile's own class scores (the GAP logits of the
    deepest level) to every pixel's logits: the network's tile-level verdict acts as a soft version
    of the label gating that pseudo masks use with true labels (a class the tile does not contain
    cannot win a pixel on texture alone). Measured on the held-out split, see docs/model.md.
    """

    def __init__(self, cfg: NetworkConfig, num_classes: int, text_dim: int) -> None:
        super().__init__()
        self.net = FProtoSegStage1(cfg, num_classes, torch.zeros(num_classes, text_dim))
        inf = cfg.inference
        self.fusion = inf.fusion
        self.flip_tta = inf.flip_tta
        self.image_logit_weight = inf.image_logit_weight
        self.image_logit_pool = inf.image_logit_pool

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        size = (x.shape[-2] // OUTPUT_STRIDE, x.shape[-1] // OUTPUT_STRIDE)
        cams = self.net(x)["cams"]
        fused = fuse_levels(cams, self.fusion, size)
        if self.image_logit_weight:
            fused = fused + self.image_logit_weight * tile_class_logits(cams[-1], self.image_logit_pool, size)
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self._logits(x)
        if self.flip_tta:
            logits = 0.5 * (logits + self._logits(x.flip(-1)).flip(-1))
        return torch.softmax(logits.float(), dim=1)


# --------------------------------------------------------------------------------------------
# Stage 2: SegFormer head on the MiT encoder, trained on pseudo masks
# --------------------------------------------------------------------------------------------


class SegFormerHead(nn.Module):
    """All-MLP decoder (SegFormer): per-level linear to E, upsample to stride 4, fuse, classify."""

    def __init__(
        self, channels: tuple[int, ...], num_classes: int, embed_dim: int = 256, dropout: float = 0.1
    ):
        super().__init__()
        self.linears = nn.ModuleList(nn.Conv2d(c, embed_dim, 1) for c in channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * len(channels), embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]
        ups = [
            F.interpolate(lin(f), size=size, mode="bilinear", align_corners=False)
            for lin, f in zip(self.linears, feats, strict=True)
        ]
        return self.classifier(self.dropout(self.fuse(torch.cat(ups, dim=1))))


class FProtoSegStage2(nn.Module):
    """Encoder (``cfg.encoder``: stage 2's own, or the teacher's) + SegFormer head; forward
    returns class logits at stride 4. ``num_classes`` counts the outputs: K tissue classes, plus
    one for background with ``stage2.background`` (index K)."""

    def __init__(self, cfg: NetworkConfig, num_classes: int) -> None:
        super().__init__()
        self.encoder = build_encoder(cfg.encoder)
        self.head = SegFormerHead(self.encoder.out_channels, num_classes, cfg.stage2.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


class Stage2Inference(nn.Module):
    def __init__(self, cfg: NetworkConfig, num_classes: int) -> None:
        super().__init__()
        self.net = FProtoSegStage2(cfg, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x).float(), dim=1)


class GatedStage2Inference(nn.Module):
    """Stage 2 with the stage-1 network's tile-level class scores added to every pixel's logits.

    Pseudo masks are gated by the true image labels; at inference there are none, and a stage-2
    softmax alone lets a rare class (normal lung here) win pixels in tiles that hold none of it.
    The frozen stage-1 teacher's GAP logits of the tile play the labels' part (ours, not from the
    paper; measured in docs/model.md). ``stage2.teacher_config`` holds the teacher's config.
    """

    def __init__(self, cfg: NetworkConfig, num_classes: int, text_dim: int) -> None:
        super().__init__()
        s2 = cfg.stage2
        if s2.teacher_config is None:
            raise ValueError("a gated stage-2 network needs stage2.teacher_config (the trainer writes it)")
        teacher_cfg = network_config(s2.teacher_config)
        self.net = FProtoSegStage2(cfg, num_classes)
        # with a background class the gate (the teacher) still knows the K tissue classes only:
        # it adds nothing to the background logit
        self.background = s2.background
        tissue = num_classes - int(self.background)
        self.gate = FProtoSegStage1(teacher_cfg, tissue, torch.zeros(tissue, text_dim))
        self.gate_weight = s2.gate_weight
        self.gate_pool = s2.gate_pool
        # stage 2's own encoder may expect another input normalisation than the teacher's
        self.renorm = Renormalise(
            encoder_normalisation(cfg.encoder), encoder_normalisation(teacher_cfg.encoder)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x).float()
        gate = tile_class_logits(self.gate(self.renorm(x))["cams"][-1], self.gate_pool, logits.shape[-2:])
        if self.background:
            gate = F.pad(gate, (0, 0, 0, 0, 0, 1))
        return torch.softmax(logits + self.gate_weight * gate, dim=1)


class Renormalise(nn.Module):
    """Input normalised for one encoder -> input normalised for another (identity when equal)."""

    def __init__(self, source: dict[str, list[float]], target: dict[str, list[float]]) -> None:
        super().__init__()
        self.identity = source == target
        scale = torch.tensor(source["std"]) / torch.tensor(target["std"])
        shift = (torch.tensor(source["mean"]) - torch.tensor(target["mean"])) / torch.tensor(target["std"])
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return x * self.scale.to(x.dtype) + self.shift.to(x.dtype)


def text_dim(manifest: dict[str, Any]) -> int:
    """The class text embeddings' width a checkpoint was trained with (its manifest's ``text``
    record; 384, MiniLM's, in checkpoints that predate the record)."""
    return int(manifest.get("text", {}).get("dim", 384))


@register("fprotoseg_cam")
def _build_stage1(config: dict[str, Any], manifest: dict[str, Any]) -> nn.Module:
    return Stage1Inference(network_config(config), len(manifest["classes"]), text_dim(manifest))


@register("fprotoseg_seg")
def _build_stage2(config: dict[str, Any], manifest: dict[str, Any]) -> nn.Module:
    return Stage2Inference(network_config(config), len(manifest["classes"]))


@register("fprotoseg_seg_gated")
def _build_stage2_gated(config: dict[str, Any], manifest: dict[str, Any]) -> nn.Module:
    return GatedStage2Inference(
        network_config(config), len(manifest["classes"]), text_dim(manifest)
    )
