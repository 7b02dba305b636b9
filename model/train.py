"""Weak-label training: stage 1 (text-prototype CAMs) or stage 2 (SegFormer on pseudo masks).

One YAML config drives a run (``model/configs/*.yaml``). Per epoch: a fixed number of iterations
on random crops that carry image-level labels only, then validation mIoU on held-out image+mask
pairs through the same predict path the service uses; a CSV row and a PNG plot are written; the
best epoch by validation mIoU is saved as a fprotoseg checkpoint (weights + manifest only).

Crops come through ``torch.utils.data`` (``model/loader.py``: lazy decoding and augmentation in
``loader.workers`` processes). Under ``torchrun`` the same command trains with DDP (NCCL on GPUs,
Gloo on CPUs): ``train.batch_size`` is the global batch, split over the processes; rank 0 alone
logs and writes files; validation is sharded over the ranks and gathered. ``resume=True``
continues exactly from the run folder's ``resume.pt`` (model, optimiser, step, GradScaler, RNG
states, loader position, history, the config it ran with), written at each epoch end and every
``train.checkpoint_every_steps`` steps.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from fprotoseg.model.checkpoint import save_checkpoint
from fprotoseg.model.datasets import (
    DATASETS,
    DatasetError,
    MaskedImage,
    WeakImageRef,
    image_level_label,
    list_pairs,
    load_pairs,
    read_pair,
    weak_refs_from_class_folder,
    weak_refs_from_labelled_folder,
    weak_refs_from_pairs,
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
from fprotoseg.model.loader import Augment, WeakBatchSampler, WeakCropDataset, make_loader
from fprotoseg.model.pseudo import IGNORE_INDEX, make_pseudo_masks, pseudo_label_map
from fprotoseg.model.stage2 import build_stage2, class_entries
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
    train: list[WeakImageRef]  # decoded lazily, in the loader's workers
    val: list[MaskedImage]
    dataset: str
    description: str


def build_data(cfg: dict[str, Any]) -> TrainData:
    """Training images (image-level labels only, not decoded yet) and validation pairs (decoded),
    from the config."""
    d = cfg.get("data")
    if not isinstance(d, dict):
        raise ConfigError("the config has no data: section (see model/configs/wsss4luad_default.yaml)")
    dataset = d.get("dataset", "wsss4luad")
    if dataset not in DATASETS:
        raise ConfigError(f"unknown data.dataset {dataset!r}")
    k = len(DATASETS[dataset].classes)
    min_frac = float(d.get("min_fraction", 0.03))
    train: list[WeakImageRef] = []
    val: list[MaskedImage] = []
    parts = []
    if "pairs_root" in d:
        pairs = list_pairs(resolve_path(d["pairs_root"]))
        holdout = set(d.get("holdout", []))
        unknown = holdout - {p.name for p in pairs}
        if unknown:
            raise ConfigError(f"held-out names not in {d['pairs_root']}: {sorted(unknown)[:5]}")
        train += weak_refs_from_pairs([p for p in pairs if p.name not in holdout], k, min_frac)
        val += [read_pair(p) for p in pairs if p.name in holdout]
        parts.append(
            f"{len(pairs) - len(holdout)} image+mask pairs of {d['pairs_root']} as crop-level image labels "
            f"(classes above {min_frac:.0%} of the crop), {len(holdout)} held out for validation"
        )
    for folder in d.get("labelled_dirs", []):
        imgs = weak_refs_from_labelled_folder(resolve_path(folder), k)
        train += imgs
        parts.append(f"{len(imgs)} filename-labelled patches of {folder}")
    for entry in d.get("class_dirs", []):
        if not isinstance(entry, dict) or "dir" not in entry or "label" not in entry:
            raise ConfigError("each data.class_dirs entry needs dir: and label: (1/0/-1 per class)")
        if len(entry["label"]) != k:
            raise ConfigError(f"data.class_dirs label {entry['label']} needs {k} entries")
        imgs = weak_refs_from_class_folder(
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


# ------------------------------------------------------------------------------------ model


def class_manifest(dataset: str) -> list[dict[str, Any]]:
    spec = DATASETS[dataset]
    return [{"name": n, "color": list(c)} for n, c in zip(spec.qupath_names, spec.colors, strict=True)]


Normalisation = dict[str, list[float]]


def to_input(batch_uint8: np.ndarray | torch.Tensor, device: str, norm: Normalisation) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW with the encoder's own statistics (as the service does).
    A (pinned) tensor is copied without blocking the host."""
    if isinstance(batch_uint8, np.ndarray):
        batch_uint8 = torch.from_numpy(np.ascontiguousarray(batch_uint8))
    x = batch_uint8.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
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
    ranks: Ranks | None = None,
) -> dict[str, Any]:
    module.eval()
    predict = inference_predict_fn(module, device, norm)
    label_fn = sharded(val, lambda p: predict_labels(predict, p.rgb, tile_px, context), ranks)
    result = score_pairs(val, label_fn, dataset)
    module.train()
    return result


def pseudo_mask_scores(
    net: torch.nn.Module, val: list[MaskedImage], dataset: str, device: str, norm: Normalisation,
    fusion: list[float], min_fraction: float, ranks: Ranks | None = None,
) -> dict[str, Any]:
    """Pseudo-mask mIoU on the validation images (each gated by its own image-level label)."""
    k = len(DATASETS[dataset].classes)

    def label_fn(p: MaskedImage) -> np.ndarray:
        x = to_input(p.rgb[None], device, norm)
        label = torch.from_numpy(image_level_label(p.mask, k, min_fraction)).to(device)
        return pseudo_label_map(net, x, label, fusion).cpu().numpy()

    return score_pairs(val, sharded(val, label_fn, ranks), dataset)


# ------------------------------------------------------------------------------------ ranks


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a ``torchrun`` job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_ranks(device: str) -> tuple[Ranks, bool]:
    """Join the ``torchrun`` process group (NCCL on CUDA, Gloo on CPU) when ``WORLD_SIZE`` > 1;
    returns the ranks and whether this call created the group (and so must destroy it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), False
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)  # "cuda" is this rank's GPU from here on
    if dist.is_initialized():
        return ranks, False
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return ranks, True


def sharded(
    items: list[MaskedImage], label_fn: Callable[[MaskedImage], np.ndarray], ranks: Ranks | None
) -> Callable[[MaskedImage], np.ndarray]:
    """``label_fn`` computed on this rank's share of ``items`` and gathered: every rank gets the
    labels of all items (and so the same metrics). Identity on one process."""
    if ranks is None or not ranks.distributed:
        return label_fn
    mine = {i: label_fn(items[i]) for i in range(ranks.rank, len(items), ranks.world_size)}
    parts: list[dict[int, np.ndarray] | None] = [None] * ranks.world_size
    dist.all_gather_object(parts, mine)
    merged = {i: lab for part in parts if part for i, lab in part.items()}
    index = {id(p): i for i, p in enumerate(items)}
    return lambda p: merged[index[id(p)]]


# ------------------------------------------------------------------------------------ state


RESUME_FILE = "resume.pt"
# keys a resumed run may change: how the run is executed, not what it computes (train.epochs
# extends or shortens the schedule: the poly learning rate then follows the new length)
RESUME_FREE_KEYS = frozenset(
    {"train.epochs", "train.threads", "train.checkpoint_every_steps", "train.tensorboard",
     "loader.workers", "loader.pin_memory"}
)


def _flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(cfg, dict) and cfg:
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs (a key missing on one side differs)."""
    fa, fb = _flat(json.loads(json.dumps(a, default=str))), _flat(json.loads(json.dumps(b, default=str)))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...))


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python random states (plain types and tensors)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically (tmp file, then rename): a run killed while writing keeps the previous state."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_resume_state(path: Path) -> dict[str, Any]:
    """Tensors and plain Python types only (``weights_only``: no code runs from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file
        raise ConfigError(f"{path} is not a readable resume state ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ConfigError(f"{path} is not a fprotoseg resume state")
    return state


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and raw bytes (the ranks of a DDP run must agree on it)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class LossModel(torch.nn.Module):
    """The trained network and its loss in one forward (what DDP wraps, so every parameter the
    loss reaches is seen by DDP's graph)."""

    def __init__(self, net: torch.nn.Module, stage: int, loss_cfg: dict[str, Any]) -> None:
        super().__init__()
        self.net, self.stage, self.loss_cfg = net, stage, loss_cfg

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, target: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        if self.stage == 1:
            out = self.net(x)
            return stage1_losses(
                self.net, {**out, "logits": [lg.float() for lg in out["logits"]]}, labels, self.loss_cfg
            )
        logits = F.interpolate(self.net(x).float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"total": F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX)}


class _NoWriter:
    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(enabled: bool, log_dir: Path | None) -> Any:
    """A SummaryWriter when ``train.tensorboard`` is on (optional dependency), else a no-op."""
    if not enabled:
        return _NoWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "train.tensorboard is true but the tensorboard package is not installed "
            "(pip install tensorboard, or set train.tensorboard: false)"
        ) from None
    return SummaryWriter(str(log_dir)) if log_dir is not None else _NoWriter()


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
    """Run one training from a config; returns the best validation result and checkpoint path.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: DDP, rank 0 writes."""
    from fprotoseg.model.segmenter import resolve_device

    device = resolve_device(device)
    ranks, created = init_ranks(device)
    try:
        return _train(cfg, Path(out_dir), device, ranks, resume, progress, log)
    finally:
        if created:
            dist.destroy_process_group()


def _train(
    cfg: dict[str, Any],
    out_dir: Path,
    device: str,
    ranks: Ranks,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    from tqdm import tqdm

    if not ranks.main:  # one log, one writer
        progress, log = False, lambda s: None
    run_cfg = cfg  # as given: what a resumed run must match
    resume_path = out_dir / RESUME_FILE
    resumed: dict[str, Any] | None = None
    if resume:
        if not resume_path.is_file():
            raise ConfigError(
                f"--resume: no {RESUME_FILE} in {out_dir} (nothing to resume; drop --resume to start afresh)"
            )
        resumed = load_resume_state(resume_path)
        differ = [kk for kk in config_diff(resumed["config"], run_cfg) if kk not in RESUME_FREE_KEYS]
        if differ:
            raise ConfigError(
                f"--resume: {resume_path} ran with another config; keys that differ: {', '.join(differ)}"
            )
    tcfg = cfg.get("train", {})
    lcfg = cfg.get("loader", {})
    tb_dir = out_dir / "tensorboard" if ranks.main else None
    writer = tensorboard_writer(bool(tcfg.get("tensorboard", False)), tb_dir)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    seed = int(cfg.get("seed", 0))
    torch.manual_seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    random.seed(seed)
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

    csv_path, best_path = (
        out_dir / "history.csv",
        out_dir / ("final.safetensors" if str(tcfg.get("keep", "best")) == "last" else "best.safetensors"),
    )
    history: list[dict[str, Any]] = []
    start_epoch, start_step, best_miou, elapsed0 = 0, 0, -1.0, 0.0
    sums0: dict[str, float] = {}
    if resumed is not None:
        module.load_state_dict(resumed["model"])
        opt.load_state_dict(resumed["optimizer"])
        if resumed["scaler"]:
            scaler.load_state_dict(resumed["scaler"])
        start_epoch, start_step = int(resumed["epoch"]), int(resumed["step"])
        best_miou, elapsed0 = float(resumed["best_miou"]), float(resumed["elapsed_s"])
        history = json.loads(resumed["history"])
        mine = resumed["ranks"][ranks.rank if ranks.rank < len(resumed["ranks"]) else 0]
        set_rng_state(mine["rng"])
        sums0 = dict(mine["sums"])  # this rank's running loss sums of the epoch in progress
        for kk in config_diff(resumed["config"], run_cfg):
            log(f"resume: {kk} changed from {_flat(resumed['config']).get(kk)} to {_flat(run_cfg).get(kk)}")
        log(
            f"resumed from {resume_path} at epoch {start_epoch + 1} step {start_step}"
            f" (best mIoU {best_miou:.4f})"
        )

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
    keep = str(tcfg.get("keep", "best"))
    if keep not in ("best", "last"):
        raise ConfigError(f"train.keep must be best or last, got {keep!r}")
    every = int(tcfg.get("checkpoint_every_steps", 0))
    contexts = [str(c) for c in tcfg.get("val_contexts", ["reflect"])]
    pseudo_fusion = [float(w) for w in cfg.get("inference", {}).get("fusion", [0.0, 0.3, 0.3, 0.4])]
    teacher_clean = bool(cfg.get("stage2", {}).get("teacher_sees_clean", False))

    workers = int(lcfg.get("workers", 2))
    dataset = WeakCropDataset(
        data.train, k, min_frac, seed=seed, area_crop_px=crop_px, augment=Augment.from_config(tcfg),
        glass_prob=float(tcfg.get("glass_prob", 0.0)), clean=teacher_clean,
    )
    batches = WeakBatchSampler(bs, iters, crop_sizes, seed, ranks.rank, ranks.world_size)
    loader = make_loader(dataset, batches, workers, bool(lcfg.get("pin_memory", True)) and device == "cuda")

    loss_model: torch.nn.Module = LossModel(net, stage, cfg.get("loss", {}))
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: levels with loss weight 0 leave their heads out of the graph
        loss_model = DistributedDataParallel(
            loss_model,
            device_ids=[ranks.local_rank] if device == "cuda" else None,
            find_unused_parameters=True,
        )

    def write_state(epoch: int, step: int, sums: dict[str, torch.Tensor], elapsed: float) -> None:
        """Collective (every rank's RNG state and loss sums are gathered); rank 0 writes."""
        own = {"rng": rng_state(), "sums": {kk: float(v) for kk, v in sums.items()}}
        states: list[Any] = [own]
        if ranks.distributed:
            states = [None] * ranks.world_size
            dist.all_gather_object(states, own)
        if not ranks.main:
            return
        save_resume_state(resume_path, {
            "format": 1,
            "config": json.loads(json.dumps(run_cfg, default=str)),
            "epoch": epoch,
            "step": step,
            "best_miou": best_miou,
            "elapsed_s": elapsed,
            "history": json.dumps(history),
            "model": {kk: v.detach().cpu() for kk, v in module.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "ranks": states,
            "world_size": ranks.world_size,
        })

    def sync_buffers() -> None:
        """BatchNorm running statistics: rank 0's everywhere (each rank updated them on its own
        share of the last batch)."""
        if ranks.distributed:
            for b in module.buffers():
                dist.broadcast(b, 0)

    module.train()
    t0 = time.time() - elapsed0
    for epoch in range(start_epoch, epochs):
        first = start_step if epoch == start_epoch else 0
        batches.set_epoch(epoch, first)
        sums: dict[str, torch.Tensor] = {
            kk: torch.tensor(v, dtype=torch.float64, device=device) for kk, v in sums0.items()
        }
        sums0 = {}
        wait_s = load_s = 0.0
        seen = 0
        t_epoch = time.perf_counter()
        bar = tqdm(
            total=iters, initial=first, desc=f"epoch {epoch + 1}/{epochs}", disable=not progress, leave=False
        )
        batch_iter = iter(loader)
        for i in range(first, iters):
            t_wait = time.perf_counter()
            batch = next(batch_iter)
            wait_s += time.perf_counter() - t_wait
            load_s += float(batch["load_s"].sum())
            it = epoch * iters + i
            for g in opt.param_groups:
                g["lr"] = poly_lr(base_lr, it, total_iters, warmup)
            x = to_input(batch["x"], device, norm)
            labels = batch["label"].to(device, non_blocking=True)
            seen += len(labels)
            if device == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device_type=device, dtype=amp_dtype, enabled=amp_dtype is not None):
                target = None
                if stage == 2:
                    # the frozen teacher labels the crop before the stain jitter (when
                    # stage2.teacher_sees_clean): the student must give the same answer under
                    # a tint shift, the error stage 1 makes most on held-out slides
                    clean = to_input(batch["clean"], device, norm) if teacher_clean else x
                    if device == "cuda":
                        clean = clean.contiguous(memory_format=torch.channels_last)
                    # unknown (-1) classes may be present: they are not gated out of the pseudo mask
                    target = make_pseudo_masks(teacher, clean, (labels != 0).float(), cfg["stage2"])
                terms = loss_model(x, labels, target)
            loss = terms["total"]
            bad = (~torch.isfinite(loss.detach())).float()
            if ranks.distributed:
                dist.all_reduce(bad)  # every rank stops together
            if bad.item():
                raise FprotosegError(
                    f"training diverged at iteration {it} (loss {loss.item()}); lower train.lr"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + v.detach().double()  # on the device: no sync
            if ranks.main and tcfg.get("tensorboard"):
                writer.add_scalar("step/loss", float(loss.detach()), it + 1)
                writer.add_scalar("step/lr", opt.param_groups[0]["lr"], it + 1)
            bar.update(1)
            if progress and (i % 10 == 0 or i + 1 == iters):
                bar.set_postfix(loss=f"{float(sums['total']) / (i + 1):.4f}")
            if every and (i + 1) % every == 0 and i + 1 < iters:
                sync_buffers()
                write_state(epoch, i + 1, sums, time.time() - t0)
        bar.close()
        wall = time.perf_counter() - t_epoch
        if ranks.distributed:  # losses: the mean over ranks
            packed = torch.stack([sums[n] for n in sorted(sums)]).to(device)
            dist.all_reduce(packed)
            sums = {n: v / ranks.world_size for n, v in zip(sorted(sums), packed, strict=True)}
        sync_buffers()
        vals = {
            c: validate(module, data.val, data.dataset, tile_px, device, norm, c, ranks) for c in contexts
        }
        val = vals[contexts[0]]
        pseudo = (
            pseudo_mask_scores(net, data.val, data.dataset, device, norm, pseudo_fusion, min_frac, ranks)
            if stage == 1
            else None
        )
        images = seen * ranks.world_size  # every rank saw its equal share
        row = {
            "epoch": epoch + 1,
            "train_loss": float(sums.get("total", 0.0)) / iters,
            **{f"train_{n}": float(v) / iters for n, v in sums.items() if n != "total"},
            "val_miou": val["miou"],
            **{f"val_iou_{n}": v for n, v in val["iou"].items()},
            # the same crops laid on glass, as a slide shows them to the worker
            **{f"val_{c}_miou": v["miou"] for c, v in vals.items() if c != contexts[0]},
            **({"val_pseudo_miou": pseudo["miou"]} if pseudo else {}),
            "lr": opt.param_groups[0]["lr"],
            # throughput of this epoch's steps (a resumed epoch: its remaining steps): training
            # end to end, and what the loader's workers can produce (their crop+augment time)
            "train_img_s": round(images / wall, 2) if wall > 0 else 0.0,
            "load_img_s": round(images * max(workers, 1) / load_s, 2) if load_s > 0 else 0.0,
            "data_wait_frac": round(wait_s / wall, 4) if wall > 0 else 0.0,
            "elapsed_s": round(time.time() - t0, 1),
        }
        history.append(row)
        if ranks.main:
            fields = list(dict.fromkeys(kk for r in history for kk in r))
            with csv_path.open("w", newline="") as fh:
                writer_csv = csv.DictWriter(fh, fieldnames=fields)
                writer_csv.writeheader()
                writer_csv.writerows(history)
            plot_history(history, out_dir / "history.png")
            for name, v in row.items():
                if isinstance(v, (int, float)) and name != "epoch":
                    writer.add_scalar(f"epoch/{name}", v, epoch + 1)
        log(
            f"epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} val mIoU {val['miou']:.4f} "
            + " ".join(f"{n}={v:.3f}" for n, v in val["iou"].items() if v is not None)
            + "".join(f" {c} {v['miou']:.4f}" for c, v in vals.items() if c != contexts[0])
            + (f" pseudo {pseudo['miou']:.4f}" if pseudo else "")
            + f" | train {row['train_img_s']:.1f} img/s, loader {row['load_img_s']:.1f} img/s,"
            f" waiting {row['data_wait_frac']:.0%} ({row['elapsed_s']:.0f}s)"
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
            if ranks.main:
                save_checkpoint(best_path, checkpoint_state(module, tcfg), manifest(metrics, epoch + 1))
        if tcfg.get("keep_every_epoch") and ranks.main:
            save_checkpoint(
                out_dir / f"epoch{epoch + 1:03d}.safetensors",
                module.state_dict(),
                manifest({"heldout": {"miou": val["miou"]}}, epoch + 1),
            )
        write_state(epoch + 1, 0, {}, time.time() - t0)
    digests = [tensors_digest(module.state_dict())]
    if ranks.distributed:
        sync_buffers()
        digests = [""] * ranks.world_size
        dist.all_gather_object(digests, tensors_digest(module.state_dict()))
        if len(set(digests)) != 1:
            raise FprotosegError(f"the {ranks.world_size} ranks ended with different weights: {digests}")
    writer.close()
    result = {
        "best_miou": best_miou,
        "checkpoint": str(best_path),
        "history": str(csv_path),
        "resume_state": str(resume_path),
        "world_size": ranks.world_size,
        "rank_state_sha256": digests,
    }
    if ranks.main:
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with value parsed as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


__all__ = ["ConfigError", "build_data", "load_config", "parse_override", "train"]
