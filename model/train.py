"""Weak-label training: stage 1 (text-prototype CAMs) or stage 2 (SegFormer on pseudo masks).

One YAML config drives a run (``model/configs/*.yaml``). Per epoch: a fixed number of iterations
on random crops that carry image-level labels only, then validation mIoU on held-out image+mask
pairs through the same predict path the service uses; a CSV row and a PNG plot are written; the
best epoch by validation mIoU is saved as a fprotoseg checkpoint. ``resume: true`` continues from
the run folder's ``last.safetensors`` (model, optimiser, epoch, RNG-free: the sampler is reseeded
per epoch so a resumed run sees the same crops as an uninterrupted one).
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint
from fprotoseg.model.datasets import (
    DATASETS,
    DatasetError,
    MaskedImage,
    WeakCropSampler,
    WeakImage,
    image_level_label,
    load_pairs,
    weak_images_from_class_folder,
    weak_images_from_labelled_folder,
    weak_images_from_pairs,
)

# ConfigError is the one ConfigurationError (same code wherever a setting or config is wrong).
from fprotoseg.model.errors import ConfigurationError as ConfigError
from fprotoseg.model.errors import FprotosegError
from fprotoseg.model.evaluate import predict_labels, score_pairs
from fprotoseg.model.fprotoseg import (
    OUTPUT_STRIDE,
    Stage1Inference,
    encoder_normalisation,
    stage1_losses,
)
from fprotoseg.model.pseudo import IGNORE_INDEX, make_pseudo_masks, pseudo_label_map
from fprotoseg.model.stage2 import build_stage2, class_entries
from fprotoseg.model.stain import hed_jitter
from fprotoseg.model.text import class_text_embeddings

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_config(
    path: str | Path,
    overrides: dict[str, Any] | None = None,
    *,
    validate: bool = True,
    check_paths: bool = True,
) -> dict[str, Any]:
    """The config at ``path`` with its ``base:`` chain merged and ``overrides`` (dotted keys) set,
    then checked against the schema (``model.config_schema``: unknown keys, types) and, with
    ``check_paths``, its dataset roots and stage-2 teacher; a problem is one ConfigError line."""
    path = Path(path)
    if not path.is_file():
        alt = REPO_ROOT / "model" / "configs" / path.name
        if not alt.is_file():
            raise ConfigError(f"config not found: {path}")
        path = alt
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path.name} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path.name} must hold a YAML mapping")
    if "base" in cfg:  # ablation configs name the config they change, then only the change
        base = load_config(path.parent / str(cfg.pop("base")), validate=False, check_paths=False)
        base.pop("name", None)
        cfg = deep_merge(base, cfg)
    for dotted, value in (overrides or {}).items():
        node = cfg
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    cfg.setdefault("name", path.stem)
    if validate:
        from fprotoseg.model import config_schema

        config_schema.validate_config(cfg, path.name)
        if check_paths:
            config_schema.check_paths(cfg, REPO_ROOT, path.name)
    return cfg


def deep_merge(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in change.items():
        out[key] = (
            deep_merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def resolve_path(p: str | Path) -> Path:
    """Config paths are relative to the repository root (so configs work from any cwd)."""
    p = Path(os.path.expandvars(str(p)))
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


# ------------------------------------------------------------------------------------ data


@dataclass
class TrainData:
    train: list[WeakImage]
    val: list[MaskedImage]
    dataset: str
    description: str


def build_data(cfg: dict[str, Any]) -> TrainData:
    """Training images (image-level labels only) and validation pairs, from the config."""
    d = cfg.get("data")
    if not isinstance(d, dict):
        raise ConfigError("the config has no data: section (see model/configs/wsss4luad_default.yaml)")
    dataset = d.get("dataset", "wsss4luad")
    if dataset not in DATASETS:
        raise ConfigError(f"unknown data.dataset {dataset!r}")
    k = len(DATASETS[dataset].classes)
    min_frac = float(d.get("min_fraction", 0.03))
    train: list[WeakImage] = []
    val: list[MaskedImage] = []
    parts = []
    if "pairs_root" in d:
        pairs = load_pairs(resolve_path(d["pairs_root"]))
        holdout = set(d.get("holdout", []))
        unknown = holdout - {p.name for p in pairs}
        if unknown:
            raise ConfigError(f"held-out names not in {d['pairs_root']}: {sorted(unknown)[:5]}")
        train += weak_images_from_pairs([p for p in pairs if p.name not in holdout], k, min_frac)
        val += [p for p in pairs if p.name in holdout]
        parts.append(
            f"{len(pairs) - len(holdout)} image+mask pairs of {d['pairs_root']} as crop-level image labels "
            f"(classes above {min_frac:.0%} of the crop), {len(holdout)} held out for validation"
        )
    for folder in d.get("labelled_dirs", []):
        imgs = weak_images_from_labelled_folder(resolve_path(folder), k)
        train += imgs
        parts.append(f"{len(imgs)} filename-labelled patches of {folder}")
    for entry in d.get("class_dirs", []):
        if not isinstance(entry, dict) or "dir" not in entry or "label" not in entry:
            raise ConfigError("each data.class_dirs entry needs dir: and label: (1/0/-1 per class)")
        if len(entry["label"]) != k:
            raise ConfigError(f"data.class_dirs label {entry['label']} needs {k} entries")
        imgs = weak_images_from_class_folder(
            resolve_path(entry["dir"]), entry["label"], float(entry.get("scale", 1.0)), entry.get("limit")
        )
        train += imgs
        parts.append(
            f"{len(imgs)} images of {entry['dir']} with the partial label {entry['label']} "
            f"(-1 = unknown, no loss), resized x{float(entry.get('scale', 1.0)):g}"
        )
    if "val_root" in d:
        val += load_pairs(resolve_path(d["val_root"]))
        parts.append(f"validation pairs {d['val_root']}")
    if not train:
        raise DatasetError("the config names no training data (data.pairs_root or data.labelled_dirs)")
    if not val:
        raise DatasetError("the config names no validation pairs (data.holdout or data.val_root)")
    return TrainData(train, val, dataset, "; ".join(parts))


def supervision_description(cfg: dict[str, Any]) -> str:
    """What the labels of this run are, in words a model card can quote: true image-level labels
    from file names or class folders, or crop-level labels cut from expert masks."""
    d = cfg.get("data", {})
    kinds = []
    if d.get("pairs_root"):
        kinds.append(
            f"crop-level image labels derived from expert masks (classes above "
            f"{float(d.get('min_fraction', 0.03)):.0%} of each training crop)"
        )
    if d.get("labelled_dirs"):
        kinds.append("true image-level labels from file names")
    if d.get("class_dirs"):
        kinds.append("partial image-level labels from class folders (-1 = unknown, no loss)")
    return "; ".join(kinds) + "; masks never reach a loss"


def augment(
    batch: np.ndarray, rng: np.random.Generator, colour: float, saturation: float = 0.0
) -> np.ndarray:
    """Flips, rot90 and a per-image stain jitter (saturation, gain and offset per RGB channel),
    image by image (one random stream order: the packaged default was trained with it)."""
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        img = np.rot90(img, int(rng.integers(4)))
        if rng.random() < 0.5:
            img = img[:, ::-1]
        out[i] = stain_jitter(img[None], rng, colour, saturation)[0]
    return out


def flip_rotate(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        img = np.rot90(img, int(rng.integers(4)))
        out[i] = img[:, ::-1] if rng.random() < 0.5 else img
    return out


def stain_jitter(
    batch: np.ndarray, rng: np.random.Generator, colour: float, saturation: float = 0.0
) -> np.ndarray:
    """Stain variation between slides dominates colour: jitter channel gains/offsets and
    saturation per image so the network has to rely on texture, not on one lab's H&E tint."""
    if colour <= 0 and saturation <= 0:
        return batch
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        f = img.astype(np.float32)
        grey = f.mean(axis=2, keepdims=True)
        if saturation > 0:
            f = grey + (f - grey) * (1.0 + rng.uniform(-saturation, saturation))
        f = f * (1.0 + rng.uniform(-colour, colour, size=3)) + rng.uniform(-colour, colour, size=3) * 40.0
        out[i] = np.clip(f, 0, 255).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------ model


def class_manifest(dataset: str) -> list[dict[str, Any]]:
    spec = DATASETS[dataset]
    return [{"name": n, "color": list(c)} for n, c in zip(spec.qupath_names, spec.colors, strict=True)]


Normalisation = dict[str, list[float]]


def to_input(batch_uint8: np.ndarray, device: str, norm: Normalisation) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW with the encoder's own statistics (as the service does)."""
    x = torch.from_numpy(np.ascontiguousarray(batch_uint8)).to(device).permute(0, 3, 1, 2).float()
    mean = torch.tensor(norm["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(norm["std"], device=device).view(1, 3, 1, 1)
    return (x / 255.0 - mean) / std


def inference_predict_fn(
    module: torch.nn.Module, device: str, norm: Normalisation
) -> Callable[[np.ndarray], np.ndarray]:
    def predict(tiles: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(to_input(tiles, device, norm)).float().cpu().numpy()

    return predict


def validate(
    module: torch.nn.Module,
    val: list[MaskedImage],
    dataset: str,
    tile_px: int,
    device: str,
    norm: Normalisation,
    context: str = "reflect",
) -> dict[str, Any]:
    module.eval()
    predict = inference_predict_fn(module, device, norm)
    result = score_pairs(val, lambda p: predict_labels(predict, p.rgb, tile_px, context), dataset)
    module.train()
    return result


def pseudo_mask_scores(
    net: torch.nn.Module, val: list[MaskedImage], dataset: str, device: str, norm: Normalisation,
    fusion: list[float], min_fraction: float,
) -> dict[str, Any]:
    """Pseudo-mask mIoU on the validation images (each gated by its own image-level label)."""
    k = len(DATASETS[dataset].classes)

    def label_fn(p: MaskedImage) -> np.ndarray:
        x = to_input(p.rgb[None], device, norm)
        label = torch.from_numpy(image_level_label(p.mask, k, min_fraction)).to(device)
        return pseudo_label_map(net, x, label, fusion).cpu().numpy()

    return score_pairs(val, label_fn, dataset)


# ------------------------------------------------------------------------------------ state


def _opt_state_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"__opt__.{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


def plot_history(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss and validation mIoU per epoch as a PNG (PIL only: no plotting library needed)."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, w - m, h - m], outline="black")
    n = len(rows)
    if n == 0:
        img.save(path)
        return
    losses = [float(r["train_loss"]) for r in rows]
    mious = [float(r["val_miou"]) for r in rows]
    lmax = max(losses) or 1.0

    def xy(i: int, v: float) -> tuple[float, float]:
        x = m + (w - 2 * m) * (i / max(n - 1, 1))
        return x, h - m - (h - 2 * m) * v

    for series, colour, norm in ((losses, (200, 0, 0), lmax), (mious, (0, 90, 200), 1.0)):
        pts = [xy(i, v / norm) for i, v in enumerate(series)]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
    d.text(
        (m, 10), f"red: train loss (max {lmax:.3f})   blue: val mIoU (best {max(mious):.3f})", fill="black"
    )
    d.text((m, h - m + 8), f"epochs 1..{n}", fill="black")
    img.save(path)


# ------------------------------------------------------------------------------------ train


def checkpoint_state(module: torch.nn.Module, tcfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict to ship; ``train.checkpoint_dtype: fp16`` halves the file (weights are cast
    back to fp32 on load, inference precision is unaffected in practice)."""
    state = module.state_dict()
    if tcfg.get("checkpoint_dtype", "fp32") == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return state


def poly_lr(base: float, it: int, total: int, warmup: int, power: float = 0.9) -> float:
    if it < warmup:
        return base * (it + 1) / warmup
    return base * (1 - (it - warmup) / max(total - warmup, 1)) ** power


def train(
    cfg: dict[str, Any],
    out_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one training from a config; returns the best validation result and checkpoint path."""
    from tqdm import tqdm

    from fprotoseg.model.segmenter import resolve_device

    device = resolve_device(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    tcfg = cfg.get("train", {})
    threads = tcfg.get("threads")
    if threads and device == "cpu":
        torch.set_num_threads(int(threads))
    stage = int(cfg.get("stage", 1))
    if stage not in (1, 2):
        raise ConfigError(f"stage must be 1 or 2, got {stage}")
    data = build_data(cfg)
    spec = DATASETS[data.dataset]
    k = len(spec.classes)
    crop_cfg = cfg["data"].get("crop_px", 128)
    crop_sizes = [int(c) for c in crop_cfg] if isinstance(crop_cfg, list) else [int(crop_cfg)]
    crop_px = max(crop_sizes)
    tile_px = int(cfg.get("tile_size_px", 256))
    min_frac = float(cfg["data"].get("min_fraction", 0.03))

    text_record: dict[str, Any] = {}
    teacher = None
    if stage == 1:
        emb, text_record = class_text_embeddings(list(spec.qupath_names), cfg.get("text", {}))
        text_record["dim"] = int(emb.shape[1])
        module: torch.nn.Module = Stage1Inference(cfg, k, emb.shape[1])
        module.net.text_embeddings.data.copy_(torch.from_numpy(emb))
        arch = "fprotoseg_cam"
        net = module.net
    elif stage == 2:
        # stage 2's own encoder (stage2.encoder, default the teacher's), an optional background
        # class (stage2.background) and the frozen teacher fed the student's inputs
        s2 = build_stage2(cfg, k, device, resolve_path(cfg["stage2"]["teacher"]))
        cfg, module, net, teacher, arch = s2.cfg, s2.module, s2.net, s2.teacher, s2.arch
        text_record = s2.text_record
    else:
        raise ConfigError(f"stage must be 1 or 2, got {stage}")

    pretrained = cfg.get("encoder", {}).get("pretrained")
    from_teacher = stage == 2 and cfg["stage2"].get("init_encoder_from_teacher", True)
    if pretrained and not from_teacher:
        from fprotoseg.model.pretrained import load_encoder_weights

        source = pretrained if pretrained == "imagenet" else resolve_path(pretrained)
        report = load_encoder_weights(net.encoder, source)
        log(
            f"pretrained encoder: {len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
            f"{len(report['shape_mismatch'])} shape-mismatched keys"
        )

    norm = encoder_normalisation(cfg.get("encoder", {}))
    module.to(device)
    if device == "cuda":
        module.to(memory_format=torch.channels_last)
    epochs = int(tcfg.get("epochs", 10))
    iters = int(tcfg.get("iters_per_epoch", 100))
    bs = int(tcfg.get("batch_size", 16))
    base_lr = float(tcfg.get("lr", 1e-4))
    opt = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad],
        lr=base_lr,
        weight_decay=float(tcfg.get("weight_decay", 1e-3)),
    )
    amp = str(tcfg.get("amp", "bf16")) if device == "cuda" else "off"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    csv_path, best_path, last_path = (
        out_dir / "history.csv",
        out_dir / ("final.safetensors" if str(tcfg.get("keep", "best")) == "last" else "best.safetensors"),
        out_dir / "last.safetensors",
    )
    history: list[dict[str, Any]] = []
    start_epoch, best_miou = 0, -1.0
    if resume and last_path.is_file():
        state, meta = read_checkpoint(last_path)
        opt_tensors = {kk: v for kk, v in state.items() if kk.startswith("__opt__.")}
        module.load_state_dict({kk: v for kk, v in state.items() if not kk.startswith("__opt__.")})
        _load_opt_state(opt, opt_tensors)
        start_epoch = int(meta["resume"]["epoch"])
        best_miou = float(meta["resume"]["best_miou"])
        if csv_path.is_file():
            with csv_path.open() as fh:
                history = list(csv.DictReader(fh))[:start_epoch]
        log(f"resumed from {last_path} at epoch {start_epoch} (best mIoU {best_miou:.4f})")

    def manifest(metrics: dict[str, Any] | None, epoch: int) -> dict[str, Any]:
        return {
            "name": cfg.get("name", "fprotoseg"),
            "architecture": arch,
            "config": cfg,
            "classes": class_entries(class_manifest(data.dataset), cfg),
            "mpp": float(cfg["data"].get("mpp", 1.0)),
            "tile_size_px": tile_px,
            "output_stride": OUTPUT_STRIDE,
            "normalisation": norm,
            "text": text_record,
            "training": {
                "data": data.description,
                "supervision": supervision_description(cfg),
                "epochs_done": epoch,
                "crop_px": crop_sizes,
            },
            "metrics": metrics or {},
        }

    total_iters = epochs * iters
    warmup = int(tcfg.get("warmup_iters", min(100, total_iters // 10)))
    colour = float(tcfg.get("colour_jitter", 0.08))
    saturation = float(tcfg.get("saturation_jitter", 0.0))
    hed = float(tcfg.get("hed_jitter", 0.0))
    glass_prob = float(tcfg.get("glass_prob", 0.0))
    keep = str(tcfg.get("keep", "best"))
    if keep not in ("best", "last"):
        raise ConfigError(f"train.keep must be best or last, got {keep!r}")
    contexts = [str(c) for c in tcfg.get("val_contexts", ["reflect"])]
    pseudo_fusion = [float(w) for w in cfg.get("inference", {}).get("fusion", [0.0, 0.3, 0.3, 0.4])]
    loss_cfg = cfg.get("loss", {})
    teacher_clean = bool(cfg.get("stage2", {}).get("teacher_sees_clean", False))
    module.train()
    t0 = time.time()
    for epoch in range(start_epoch, epochs):
        sampler = WeakCropSampler(
            data.train, crop_px, k, min_frac, seed=seed * 1000 + epoch, glass_prob=glass_prob
        )
        rng = np.random.default_rng(seed * 1000 + epoch + 1)
        sums: dict[str, float] = {}
        bar = tqdm(
            sampler.batches(bs, iters, crop_sizes if len(crop_sizes) > 1 else None),
            total=iters,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
        )
        for i, (crops, labels_np) in enumerate(bar):
            it = epoch * iters + i
            for g in opt.param_groups:
                g["lr"] = poly_lr(base_lr, it, total_iters, warmup)
            if teacher_clean:
                geometric = flip_rotate(crops, rng)
                tinted = stain_jitter(geometric, rng, colour, saturation)
                x = to_input(hed_jitter(tinted, rng, hed), device, norm)
            else:
                x = to_input(hed_jitter(augment(crops, rng, colour, saturation), rng, hed), device, norm)
            labels = torch.from_numpy(labels_np).to(device)
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
                if stage == 1:
                    out = net(x)
                    terms = stage1_losses(
                        net, {**out, "logits": [lg.float() for lg in out["logits"]]}, labels, loss_cfg
                    )
                else:
                    # the frozen teacher labels the crop before the stain jitter (when
                    # stage2.teacher_sees_clean): the student must give the same answer under
                    # a tint shift, the error stage 1 makes most on held-out slides
                    seen = to_input(geometric, device, norm) if teacher_clean else x
                    if device == "cuda":
                        seen = seen.contiguous(memory_format=torch.channels_last)
                    # unknown (-1) classes may be present: they are not gated out of the pseudo mask
                    target = make_pseudo_masks(teacher, seen, (labels != 0).float(), cfg["stage2"])
                    logits = F.interpolate(
                        net(x).float(), size=x.shape[-2:], mode="bilinear", align_corners=False
                    )
                    terms = {"total": F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)}
            loss = terms["total"]
            if not torch.isfinite(loss):
                raise FprotosegError(
                    f"training diverged at iteration {it} (loss {loss.item()}); lower train.lr"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{sums['total'] / (i + 1):.4f}")
        vals = {c: validate(module, data.val, data.dataset, tile_px, device, norm, c) for c in contexts}
        val = vals[contexts[0]]
        pseudo = (
            pseudo_mask_scores(net, data.val, data.dataset, device, norm, pseudo_fusion, min_frac)
            if stage == 1
            else None
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": sums.get("total", 0.0) / iters,
            **{f"train_{n}": v / iters for n, v in sums.items() if n != "total"},
            "val_miou": val["miou"],
            **{f"val_iou_{n}": v for n, v in val["iou"].items()},
            # the same crops laid on glass, as a slide shows them to the worker
            **{f"val_{c}_miou": v["miou"] for c, v in vals.items() if c != contexts[0]},
            **({"val_pseudo_miou": pseudo["miou"]} if pseudo else {}),
            "lr": opt.param_groups[0]["lr"],
            "elapsed_s": round(time.time() - t0, 1),
        }
        history.append(row)
        fields = list(dict.fromkeys(kk for r in history for kk in r))
        with csv_path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            writer.writerows(history)
        plot_history(history, out_dir / "history.png")
        log(
            f"epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} val mIoU {val['miou']:.4f} "
            + " ".join(f"{n}={v:.3f}" for n, v in val["iou"].items() if v is not None)
            + "".join(f" {c} {v['miou']:.4f}" for c, v in vals.items() if c != contexts[0])
            + (f" pseudo {pseudo['miou']:.4f}" if pseudo else "")
            + f" ({row['elapsed_s']:.0f}s)"
        )
        # keep: best = the epoch with the best validation mIoU (optimistic when reported: chosen
        # on the split); keep: last = a fixed schedule, the honest choice for a model card
        score = float(np.mean([v["miou"] for v in vals.values()]))
        if keep == "last" or score > best_miou:
            best_miou = score
            best_miou = val["miou"]
            metrics = {
                "heldout": {kk: val[kk] for kk in ("miou", "iou", "fwiou", "dice", "images")},
                **{
                    f"heldout_{c}": {kk: v[kk] for kk in ("miou", "iou")}
                    for c, v in vals.items()
                    if c != contexts[0]
                },
                "epoch": epoch + 1,
                "kept": keep,
            }
            save_checkpoint(best_path, checkpoint_state(module, tcfg), manifest(metrics, epoch + 1))
        if tcfg.get("keep_every_epoch"):
            save_checkpoint(
                out_dir / f"epoch{epoch + 1:03d}.safetensors",
                module.state_dict(),
                manifest({"heldout": {"miou": val["miou"]}}, epoch + 1),
            )
        resume_manifest = manifest(None, epoch + 1)
        resume_manifest["resume"] = {"epoch": epoch + 1, "best_miou": best_miou}
        save_checkpoint(last_path, {**module.state_dict(), **_opt_state_tensors(opt)}, resume_manifest)
    result = {"best_miou": best_miou, "checkpoint": str(best_path), "history": str(csv_path)}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with value parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


__all__ = ["ConfigError", "build_data", "load_config", "parse_override", "train"]
