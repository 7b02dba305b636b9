"""Export a stage-1 checkpoint's pseudo masks as palette PNGs, and score them where masks exist.

``fprotoseg pseudo CONFIG --checkpoint STAGE1 --out DIR``: the masks stage 2 would train on, for
the config's training images (``DIR/train``) and validation pairs (``DIR/val``), made by the same
code as in training (:func:`fprotoseg.model.training.pseudo.make_pseudo_masks`: label-gated, level-fused,
min-max normalised CAMs, background (1 - max)^k, flip and 90-degree rotation TTA; with
``stage2.background`` the white prior's background class). Each image is gated by its own
image-level label (file name, class folder, or the classes of its mask above
``data.min_fraction``).

Pixel values: 0..K-1 tissue classes, K background (with ``stage2.background``), 255 = ignore (the
CAM background won: no target there). Where an image has a mask, the pseudo mask is scored
against it (pseudo-mask mIoU, the standard intermediate figure of WSSS papers): ignore pixels
count as background predictions, so a tissue pixel left without a target is a miss. The scores
go to ``DIR/pseudo_miou.json`` and one line per split to the log.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fprotoseg.model.config_schema import NetworkConfig, PseudoMaskConfig, TrainConfig
from fprotoseg.model.training.datasets import DATASETS, MaskedImage, image_level_label
from fprotoseg.model.training.evaluate import score_pairs
from fprotoseg.model.training.pseudo import IGNORE_INDEX, make_pseudo_masks
from fprotoseg.model.training.stage2 import TeacherView, load_teacher

TTA_MODES = ("none", "flip", "flip_rot")


def palette(dataset: str) -> list[int]:
    """Dataset colours for 0..K-1, white for background (K), black for ignore (255)."""
    spec = DATASETS[dataset]
    colours = [*spec.colors, (255, 255, 255)]
    flat = [v for c in colours for v in c]
    return flat + [0] * (768 - len(flat))


def save_palette_png(path: Path, mask: np.ndarray, dataset: str) -> None:
    im = Image.fromarray(mask.astype(np.uint8), mode="P")
    im.putpalette(palette(dataset))
    im.save(path)


def pseudo_settings(cfg: TrainConfig, teacher_cfg: NetworkConfig, tta: str) -> PseudoMaskConfig:
    """How the masks are made: the config's ``stage2`` section, its fusion only where the config
    sets one (else the teacher's own inference fusion); TTA from ``tta``."""
    if tta not in TTA_MODES:
        raise ValueError(f"tta must be one of {TTA_MODES}, got {tta!r}")
    s2 = cfg.stage2
    fusion = s2.fusion if "fusion" in s2.model_fields_set else teacher_cfg.inference.fusion
    return PseudoMaskConfig(
        fusion=fusion,
        bg_power=s2.bg_power,
        flip_tta=tta in ("flip", "flip_rot"),
        rot_tta=tta == "flip_rot",
        background=s2.background,
        white_prior=s2.white_prior,
    )


def export_pseudo_masks(
    cfg: TrainConfig,
    checkpoint: Path,
    out_dir: Path,
    *,
    device: str = "cpu",
    tta: str = "flip_rot",
    protocol: str = "paper",
    splits: tuple[str, ...] = ("train", "val"),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the pseudo masks of ``splits`` and return (and write) their scores per split."""
    from fprotoseg.model.training.train import build_data

    data = build_data(cfg)
    spec = DATASETS[data.dataset]
    k = len(spec.classes)
    min_frac = cfg.data.min_fraction
    teacher = load_teacher(checkpoint, k)
    view = TeacherView(teacher.net, teacher.normalisation, teacher.normalisation).to(device).eval()
    settings = pseudo_settings(cfg, teacher.config, tta)
    background = settings.background
    norm = teacher.normalisation
    mean = torch.tensor(norm["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, 3, 1, 1)

    def pseudo(rgb: np.ndarray, label: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(2, 0, 1)[None].float()
        x = (x / 255.0 - mean) / std
        h, w = x.shape[-2:]
        ph, pw = -h % 32, -w % 32  # every encoder level divides the padded size, either way round
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if ph < h and pw < w else "replicate")
        lab = torch.from_numpy((np.asarray(label) != 0).astype(np.float32))[None].to(device)
        with torch.inference_mode():
            mask = make_pseudo_masks(view, x, lab, settings)[0, :h, :w]
        return mask.cpu().numpy()

    unknown = set(splits) - {"train", "val"}
    if unknown:
        raise ValueError(f"splits are train and val, got {sorted(unknown)}")
    images: dict[str, list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]] = {
        # training images are listed lazily (model/training/loader.py decodes them); decoded here if asked for
        "train": [(im.name, im.rgb, im.label, im._mask) for im in (ref.load() for ref in data.train)]
        if "train" in splits
        else [],
        "val": [(p.name, p.rgb, image_level_label(p.mask, k, min_frac), p.mask) for p in data.val],
    }
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "dataset": data.dataset,
        "tta": tta,
        "background_class": background,
        "values": {
            **{str(i): c for i, c in enumerate(spec.classes)},
            **({str(k): "background"} if background else {}),
            str(IGNORE_INDEX): "ignore",
        },
        "splits": {},
    }
    for split in splits:
        items = images[split]
        folder = out_dir / split
        folder.mkdir(parents=True, exist_ok=True)
        scored: list[MaskedImage] = []
        made: dict[str, np.ndarray] = {}
        ignored = 0
        for name, rgb, label, gt in items:
            mask = pseudo(rgb, label)
            save_palette_png(folder / (Path(name).stem + ".png"), mask, data.dataset)
            ignored += int((mask == IGNORE_INDEX).sum())
            if gt is not None:
                scored.append(MaskedImage(name, rgb, gt))
                made[name] = mask
        report: dict[str, Any] = {"images": len(items), "folder": str(folder)}
        pixels = sum(int(rgb.shape[0] * rgb.shape[1]) for _, rgb, _, _ in items)
        report["ignored_fraction"] = ignored / max(pixels, 1)
        if scored:

            def as_labels(p: MaskedImage, made: dict[str, np.ndarray] = made) -> np.ndarray:
                m = made[p.name].copy()
                m[m == IGNORE_INDEX] = k  # no target = background: a miss on tissue
                return m

            scores = score_pairs(scored, as_labels, data.dataset, protocol)
            report.update(
                scored_images=len(scored),
                **{key: scores[key] for key in ("miou", "miou_present", "iou", "fwiou", "protocol")},
                protocol_source=scores["protocol_source"],
            )
            log(
                f"pseudo masks {split}: mIoU {scores['miou']:.4f} on {len(scored)} images with masks ("
                + " ".join(f"{n}={v:.3f}" for n, v in scores["iou"].items() if v is not None)
                + f"; {scores['protocol']}), {report['ignored_fraction']:.1%} ignore"
            )
        else:
            log(f"pseudo masks {split}: {len(items)} images written (no masks to score)")
        result["splits"][split] = report
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "pseudo_miou.json").write_text(json.dumps(result, indent=2))
    return result
