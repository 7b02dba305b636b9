"""Weak-label training: stage 1 (text-prototype CAMs) or stage 2 (SegFormer on pseudo masks).

One YAML config drives a run (``model/configs/*.yaml``). Per epoch: a fixed number of iterations
on random crops that carry image-level labels only, then validation mIoU on held-out image+mask
pairs through the same predict path the service uses; a CSV row and a PNG plot are written; the
best epoch by validation mIoU is saved as a fprotoseg checkpoint (weights + manifest only).

Crops come through ``torch.utils.data`` (``model/training/loader.py``: lazy decoding and augmentation in
``loader.workers`` processes). Under ``torchrun`` the same command trains with DDP (NCCL on GPUs,
Gloo on CPUs): ``train.batch_size`` is the global batch, split over the processes; rank 0 alone
logs and writes files; validation is sharded over the ranks and gathered. ``resume=True``
continues exactly from the run folder's ``resume.pt`` (model, optimiser, step, GradScaler, RNG
states, loader position, history, the config it ran with), written at each epoch end and every
``train.checkpoint_every_steps`` steps.

The config is a validated :class:`~fprotoseg.model.config_schema.TrainConfig` (loaded by
``config_schema.load_config``); a run is :func:`setup_run` (data, network, optimiser, loader),
then per epoch :func:`train_epoch`, :func:`score_epoch` and :func:`keep_checkpoints`. The resume
state lives in ``model/training/resume.py``, the history files in ``model/training/history.py``, the
ranks of a ``torchrun`` job in ``model/training/ranks.py``.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from fprotoseg.model.checkpoint import save_checkpoint
from fprotoseg.model.config_schema import (
    LossConfig,
    TrainConfig,
    TrainSection,
    as_dict,
    as_train_config,
    resolve_path,
)

# ConfigError is the one ConfigurationError (same code wherever a setting or config is wrong).
from fprotoseg.model.errors import ConfigurationError as ConfigError
from fprotoseg.model.errors import FprotosegError
from fprotoseg.model.networks.fprotoseg import (
    OUTPUT_STRIDE,
    Stage1Inference,
    encoder_normalisation,
    stage1_losses,
)
from fprotoseg.model.networks.text import class_text_embeddings
from fprotoseg.model.training.datasets import (
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
from fprotoseg.model.training.evaluate import predict_labels, score_pairs
from fprotoseg.model.training.history import ScalarWriter, epoch_line, tensorboard_writer, write_history
from fprotoseg.model.training.loader import Augment, WeakBatchSampler, WeakCropDataset, make_loader
from fprotoseg.model.training.pseudo import IGNORE_INDEX, make_pseudo_masks, pseudo_label_map
from fprotoseg.model.training.ranks import Ranks, init_ranks, sharded, sync_buffers
from fprotoseg.model.training.resume import (
    RESUME_FILE,
    Progress,
    config_diff,
    flat_config,
    open_resume_state,
    restore,
    tensors_digest,
    write_resume_state,
)
from fprotoseg.model.training.stage2 import build_stage2, class_entries

# ------------------------------------------------------------------------------------ data


@dataclass
class TrainData:
    train: list[WeakImageRef]  # decoded lazily, in the loader's workers
    val: list[MaskedImage]
    dataset: str
    description: str


def build_data(cfg: TrainConfig) -> TrainData:
    """Training images (image-level labels only, not decoded yet) and validation pairs (decoded),
    from the config."""
    d = cfg.data
    dataset = d.dataset
    k = len(DATASETS[dataset].classes)
    min_frac = d.min_fraction
    train: list[WeakImageRef] = []
    val: list[MaskedImage] = []
    parts = []
    if d.pairs_root is not None:
        pairs = list_pairs(resolve_path(d.pairs_root))
        holdout = set(d.holdout)
        unknown = holdout - {p.name for p in pairs}
        if unknown:
            raise ConfigError(f"held-out names not in {d.pairs_root}: {sorted(unknown)[:5]}")
        train += weak_refs_from_pairs([p for p in pairs if p.name not in holdout], k, min_frac)
        val += [read_pair(p) for p in pairs if p.name in holdout]
        parts.append(
            f"{len(pairs) - len(holdout)} image+mask pairs of {d.pairs_root} as crop-level image labels "
            f"(classes above {min_frac:.0%} of the crop), {len(holdout)} held out for validation"
        )
    for folder in d.labelled_dirs:
        imgs = weak_refs_from_labelled_folder(resolve_path(folder), k)
        train += imgs
        parts.append(f"{len(imgs)} filename-labelled patches of {folder}")
    for entry in d.class_dirs:
        if len(entry.label) != k:
            raise ConfigError(f"data.class_dirs label {entry.label} needs {k} entries")
        imgs = weak_refs_from_class_folder(
            resolve_path(entry.dir), list(entry.label), entry.scale, entry.limit
        )
        train += imgs
        parts.append(
            f"{len(imgs)} images of {entry.dir} with the partial label {entry.label} "
            f"(-1 = unknown, no loss), resized x{entry.scale:g}"
        )
    if d.val_root is not None:
        val += load_pairs(resolve_path(d.val_root))
        parts.append(f"validation pairs {d.val_root}")
    if not train:
        raise DatasetError("the config names no training data (data.pairs_root or data.labelled_dirs)")
    if not val:
        raise DatasetError("the config names no validation pairs (data.holdout or data.val_root)")
    return TrainData(train, val, dataset, "; ".join(parts))


def supervision_description(cfg: TrainConfig) -> str:
    """What the labels of this run are, in words a model card can quote: true image-level labels
    from file names or class folders, or crop-level labels cut from expert masks."""
    d = cfg.data
    kinds = []
    if d.pairs_root:
        kinds.append(
            f"crop-level image labels derived from expert masks (classes above "
            f"{d.min_fraction:.0%} of each training crop)"
        )
    if d.labelled_dirs:
        kinds.append("true image-level labels from file names")
    if d.class_dirs:
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


# ------------------------------------------------------------------------------------ train


class LossModel(torch.nn.Module):
    """The trained network and its loss in one forward (what DDP wraps, so every parameter the
    loss reaches is seen by DDP's graph)."""

    def __init__(self, net: torch.nn.Module, stage: int, loss_cfg: LossConfig) -> None:
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


def checkpoint_state(module: torch.nn.Module, train_cfg: TrainSection) -> dict[str, torch.Tensor]:
    """The state dict to ship; ``train.checkpoint_dtype: fp16`` halves the file (weights are cast
    back to fp32 on load, inference precision is unaffected in practice)."""
    state: dict[str, torch.Tensor] = module.state_dict()
    if train_cfg.checkpoint_dtype == "fp16":
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    return state


def poly_lr(base: float, it: int, total: int, warmup: int, power: float = 0.9) -> float:
    if it < warmup:
        return base * (it + 1) / warmup
    return float(base * (1 - (it - warmup) / max(total - warmup, 1)) ** power)


@dataclass
class Network:
    """What a run trains: the served module, the trained network inside it, stage 2's teacher."""

    cfg: TrainConfig  # as the checkpoint records it (stage 2: its own encoder, resolved stage2)
    module: torch.nn.Module  # what the checkpoint serves
    net: torch.nn.Module  # the trained network (module.net)
    teacher: torch.nn.Module | None  # stage 2's frozen labeller (a stage2.TeacherView)
    arch: str
    text_record: dict[str, Any]


@dataclass
class Run:
    """Everything a run's epochs use, built once by :func:`setup_run`."""

    cfg: TrainConfig  # the network's resolved config (``Network.cfg``)
    run_config: dict[str, Any]  # the config as given: what a resumed run must match
    out_dir: Path
    device: str
    ranks: Ranks
    data: TrainData
    network: Network
    norm: Normalisation
    crop_sizes: list[int]
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    batches: WeakBatchSampler
    loader: Any  # torch.utils.data.DataLoader of WeakCropDataset batches
    loss_model: torch.nn.Module  # LossModel, DDP-wrapped when distributed
    writer: ScalarWriter
    warmup_iters: int
    log: Callable[[str], None]

    @property
    def checkpoint_path(self) -> Path:
        name = "final.safetensors" if self.cfg.train.keep == "last" else "best.safetensors"
        return self.out_dir / name

    @property
    def total_iters(self) -> int:
        return self.cfg.train.epochs * self.cfg.train.iters_per_epoch


def build_network(cfg: TrainConfig, k: int, class_names: list[str], device: str) -> Network:
    """Stage 1: the text-prototype CAM network with its class text embeddings. Stage 2: its own
    encoder, an optional background class (``stage2.background``) and the frozen teacher fed the
    student's inputs (``model.training.stage2``)."""
    if cfg.stage == 1:
        emb, text_record = class_text_embeddings(class_names, cfg.text)
        text_record["dim"] = int(emb.shape[1])
        module = Stage1Inference(cfg, k, emb.shape[1])
        module.net.text_embeddings.data.copy_(torch.from_numpy(emb))
        return Network(cfg, module, module.net, None, "fprotoseg_cam", text_record)
    if cfg.stage2.teacher is None:  # the schema refuses a stage-2 config without one
        raise ConfigError("stage 2 needs stage2.teacher")
    s2 = build_stage2(cfg, k, device, resolve_path(cfg.stage2.teacher))
    return Network(s2.cfg, s2.module, s2.net, s2.teacher, s2.arch, s2.text_record)


def setup_run(
    cfg: TrainConfig, run_config: dict[str, Any], out_dir: Path, device: str, ranks: Ranks,
    log: Callable[[str], None],
) -> Run:
    """Seeds, data, network (with its pretrained encoder), optimiser, mixed precision, loader."""
    tc = cfg.train
    writer = tensorboard_writer(tc.tensorboard, out_dir / "tensorboard" if ranks.main else None)
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed & 0xFFFFFFFF)
    random.seed(cfg.seed)
    if tc.threads and device == "cpu":
        torch.set_num_threads(tc.threads)
    data = build_data(cfg)
    spec = DATASETS[data.dataset]
    k = len(spec.classes)
    crop_px = cfg.data.crop_px
    crop_sizes = [int(c) for c in crop_px] if isinstance(crop_px, list) else [crop_px]

    network = build_network(cfg, k, list(spec.qupath_names), device)
    cfg = network.cfg
    pretrained = cfg.encoder.pretrained
    from_teacher = cfg.stage == 2 and bool(cfg.stage2.init_encoder_from_teacher)
    if pretrained and not from_teacher:
        from fprotoseg.model.networks.pretrained import load_encoder_weights

        source = pretrained if pretrained == "imagenet" else resolve_path(pretrained)
        report = load_encoder_weights(network.net.encoder, source)
        log(
            f"pretrained encoder: {len(report['missing'])} missing, {len(report['unexpected'])} unexpected, "
            f"{len(report['shape_mismatch'])} shape-mismatched keys"
        )
    module = network.module
    module.to(device)
    if device == "cuda":
        module.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(
        [p for p in module.parameters() if p.requires_grad], lr=tc.lr, weight_decay=tc.weight_decay
    )
    amp = tc.amp if device == "cuda" else "off"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    dataset = WeakCropDataset(
        data.train, k, cfg.data.min_fraction, seed=cfg.seed, area_crop_px=max(crop_sizes),
        augment=Augment.from_config(tc), glass_prob=tc.glass_prob,
        clean=cfg.stage == 2 and cfg.stage2.teacher_sees_clean,
    )
    batches = WeakBatchSampler(
        tc.batch_size, tc.iters_per_epoch, crop_sizes, cfg.seed, ranks.rank, ranks.world_size
    )
    loader = make_loader(dataset, batches, cfg.loader.workers, cfg.loader.pin_memory and device == "cuda")
    loss_model: torch.nn.Module = LossModel(network.net, cfg.stage, cfg.loss)
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # find_unused_parameters: levels with loss weight 0 leave their heads out of the graph
        loss_model = DistributedDataParallel(
            loss_model,
            device_ids=[ranks.local_rank] if device == "cuda" else None,
            find_unused_parameters=True,
        )
    total = tc.epochs * tc.iters_per_epoch
    warmup = tc.warmup_iters if tc.warmup_iters is not None else min(100, total // 10)
    return Run(
        cfg, run_config, out_dir, device, ranks, data, network, encoder_normalisation(cfg.encoder),
        crop_sizes, opt, scaler, amp_dtype, batches, loader, loss_model, writer, warmup, log,
    )


def manifest(run: Run, metrics: dict[str, Any] | None, epoch: int) -> dict[str, Any]:
    """The checkpoint manifest after ``epoch`` epochs (``model.checkpoint``)."""
    cfg = run.cfg
    return {
        "name": cfg.name or "fprotoseg",
        "architecture": run.network.arch,
        "config": as_dict(cfg),
        "classes": class_entries(class_manifest(run.data.dataset), cfg),
        "mpp": cfg.data.mpp,
        "tile_size_px": cfg.tile_size_px,
        "output_stride": OUTPUT_STRIDE,
        "normalisation": run.norm,
        "text": run.network.text_record,
        "training": {
            "data": run.data.description,
            "supervision": supervision_description(cfg),
            "epochs_done": epoch,
            "crop_px": run.crop_sizes,
        },
        "metrics": metrics or {},
    }


@dataclass
class EpochStats:
    sums: dict[str, torch.Tensor]  # loss term -> sum over the epoch's steps (mean over ranks)
    seen: int  # crops this rank trained on
    wall_s: float
    wait_s: float  # waiting for the loader
    load_s: float  # the loader's workers' crop+augment time


def train_epoch(run: Run, progress: Progress, epoch: int, t0: float, progress_bar: bool) -> EpochStats:
    """One epoch's steps (from ``progress.step`` when resuming mid-epoch), with the mid-epoch
    resume states of ``train.checkpoint_every_steps``."""
    from tqdm import tqdm

    cfg, device, ranks = run.cfg, run.device, run.ranks
    iters, every = cfg.train.iters_per_epoch, cfg.train.checkpoint_every_steps
    first = progress.step
    run.batches.set_epoch(epoch, first)
    sums = {k: torch.tensor(v, dtype=torch.float64, device=device) for k, v in progress.sums.items()}
    progress.sums, progress.step = {}, 0
    wait_s = load_s = 0.0
    seen = 0
    t_epoch = time.perf_counter()
    bar = tqdm(
        total=iters, initial=first, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not progress_bar,
        leave=False,
    )
    batch_iter = iter(run.loader)
    for i in range(first, iters):
        t_wait = time.perf_counter()
        batch = next(batch_iter)
        wait_s += time.perf_counter() - t_wait
        load_s += float(batch["load_s"].sum())
        it = epoch * iters + i
        for g in run.opt.param_groups:
            g["lr"] = poly_lr(cfg.train.lr, it, run.total_iters, run.warmup_iters)
        x = to_input(batch["x"], device, run.norm)
        labels = batch["label"].to(device, non_blocking=True)
        seen += len(labels)
        if device == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
            target = None
            if run.network.teacher is not None:
                # the frozen teacher labels the crop before the stain jitter (when
                # stage2.teacher_sees_clean): the student must give the same answer under
                # a tint shift, the error stage 1 makes most on held-out slides
                clean = to_input(batch["clean"], device, run.norm) if cfg.stage2.teacher_sees_clean else x
                if device == "cuda":
                    clean = clean.contiguous(memory_format=torch.channels_last)
                # unknown (-1) classes may be present: they are not gated out of the pseudo mask
                target = make_pseudo_masks(run.network.teacher, clean, (labels != 0).float(), cfg.stage2)
            terms = run.loss_model(x, labels, target)
        loss = terms["total"]
        bad = (~torch.isfinite(loss.detach())).float()
        if ranks.distributed:
            dist.all_reduce(bad)  # every rank stops together
        if bad.item():
            raise FprotosegError(f"training diverged at iteration {it} (loss {loss.item()}); lower train.lr")
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        run.scaler.step(run.opt)
        run.scaler.update()
        for name, v in terms.items():
            term = v.detach().double()  # summed on the device: no sync
            sums[name] = sums[name] + term if name in sums else term
        if ranks.main and cfg.train.tensorboard:
            run.writer.add_scalar("step/loss", float(loss.detach()), it + 1)
            run.writer.add_scalar("step/lr", run.opt.param_groups[0]["lr"], it + 1)
        bar.update(1)
        if progress_bar and (i % 10 == 0 or i + 1 == iters):
            bar.set_postfix(loss=f"{float(sums['total']) / (i + 1):.4f}")
        if every and (i + 1) % every == 0 and i + 1 < iters:
            sync_buffers(run.network.module, ranks)
            mid = dataclasses.replace(progress, epoch=epoch, step=i + 1, elapsed_s=time.time() - t0)
            write_resume_state(
                run.out_dir / RESUME_FILE, run.run_config, mid, sums, run.network.module, run.opt,
                run.scaler, ranks,
            )
    bar.close()
    wall = time.perf_counter() - t_epoch
    if ranks.distributed:  # losses: the mean over ranks
        packed = torch.stack([sums[n] for n in sorted(sums)]).to(device)
        dist.all_reduce(packed)
        sums = {n: v / ranks.world_size for n, v in zip(sorted(sums), packed, strict=True)}
    sync_buffers(run.network.module, ranks)
    return EpochStats(sums, seen, wall, wait_s, load_s)


def score_epoch(
    run: Run, epoch: int, stats: EpochStats, t0: float
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Validation in every ``train.val_contexts`` context (and stage 1's pseudo-mask mIoU):
    the epoch's history row and the scores per context."""
    cfg, ranks, data, iters = run.cfg, run.ranks, run.data, run.cfg.train.iters_per_epoch
    contexts = cfg.train.val_contexts
    module = run.network.module
    vals: dict[str, dict[str, Any]] = {
        c: validate(module, data.val, data.dataset, cfg.tile_size_px, run.device, run.norm, c, ranks)
        for c in contexts
    }
    val = vals[contexts[0]]
    pseudo = None
    if cfg.stage == 1:
        pseudo = pseudo_mask_scores(
            run.network.net, data.val, data.dataset, run.device, run.norm, cfg.inference.fusion,
            cfg.data.min_fraction, ranks,
        )
    images = stats.seen * ranks.world_size  # every rank saw its equal share
    wall = stats.wall_s
    row = {
        "epoch": epoch + 1,
        "train_loss": float(stats.sums.get("total", 0.0)) / iters,
        **{f"train_{n}": float(v) / iters for n, v in stats.sums.items() if n != "total"},
        "val_miou": val["miou"],
        **{f"val_iou_{n}": v for n, v in val["iou"].items()},
        # the same crops laid on glass, as a slide shows them to the worker
        **{f"val_{c}_miou": v["miou"] for c, v in vals.items() if c != contexts[0]},
        **({"val_pseudo_miou": pseudo["miou"]} if pseudo else {}),
        "lr": run.opt.param_groups[0]["lr"],
        # throughput of this epoch's steps (a resumed epoch: its remaining steps): training
        # end to end, and what the loader's workers can produce (their crop+augment time)
        "train_img_s": round(images / wall, 2) if wall > 0 else 0.0,
        "load_img_s": (
            round(images * max(cfg.loader.workers, 1) / stats.load_s, 2) if stats.load_s > 0 else 0.0
        ),
        "data_wait_frac": round(stats.wait_s / wall, 4) if wall > 0 else 0.0,
        "elapsed_s": round(time.time() - t0, 1),
    }
    return row, vals


def keep_checkpoints(run: Run, progress: Progress, vals: dict[str, dict[str, Any]], epoch: int) -> None:
    """``keep: best`` = the epoch with the best mean validation mIoU over the contexts
    (optimistic when reported: chosen on the split); ``keep: last`` = a fixed schedule, the
    honest choice for a model card. ``progress.best_miou`` is the kept epoch's score, the one
    later epochs are compared with. ``keep_every_epoch`` writes each epoch's file as well."""
    cfg, module = run.cfg, run.network.module
    first = cfg.train.val_contexts[0]
    val = vals[first]
    score = float(np.mean([v["miou"] for v in vals.values()]))
    if cfg.train.keep == "last" or score > progress.best_miou:
        progress.best_miou = score
        metrics = {
            "heldout": {k: val[k] for k in ("miou", "iou", "fwiou", "dice", "images")},
            **{f"heldout_{c}": {k: v[k] for k in ("miou", "iou")} for c, v in vals.items() if c != first},
            "epoch": epoch + 1,
            "kept": cfg.train.keep,
        }
        if run.ranks.main:
            save_checkpoint(
                run.checkpoint_path, checkpoint_state(module, cfg.train), manifest(run, metrics, epoch + 1)
            )
    if cfg.train.keep_every_epoch and run.ranks.main:
        save_checkpoint(
            run.out_dir / f"epoch{epoch + 1:03d}.safetensors",
            module.state_dict(),
            manifest(run, {"heldout": {"miou": val["miou"]}}, epoch + 1),
        )


def train(
    cfg: TrainConfig | Mapping[str, Any],
    out_dir: str | Path,
    *,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run one training from a config (a TrainConfig, or the mapping it validates from); returns
    the best validation result and checkpoint path.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) every process calls this: DDP, rank 0 writes."""
    from fprotoseg.model.segmenter import resolve_device

    config = as_train_config(cfg)
    device = resolve_device(device)
    ranks, created = init_ranks(device)
    try:
        return _train(config, Path(out_dir), device, ranks, resume, progress, log)
    finally:
        if created:
            dist.destroy_process_group()


def _train(
    cfg: TrainConfig,
    out_dir: Path,
    device: str,
    ranks: Ranks,
    resume: bool,
    progress_bar: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    if not ranks.main:  # one log, one writer
        progress_bar, log = False, lambda s: None
    run_config = as_dict(cfg)
    state = open_resume_state(out_dir, run_config) if resume else None
    run = setup_run(cfg, run_config, out_dir, device, ranks, log)
    progress = Progress()
    if state is not None:
        progress = restore(state, run.network.module, run.opt, run.scaler, ranks)
        old, new = flat_config(state["config"]), flat_config(run_config)
        for k in config_diff(state["config"], run_config):
            log(f"resume: {k} changed from {old.get(k)} to {new.get(k)}")
        log(
            f"resumed from {out_dir / RESUME_FILE} at epoch {progress.epoch + 1} step {progress.step}"
            f" (best mIoU {progress.best_miou:.4f})"
        )
    module = run.network.module
    module.train()
    t0 = time.time() - progress.elapsed_s
    epochs = cfg.train.epochs
    for epoch in range(progress.epoch, epochs):
        stats = train_epoch(run, progress, epoch, t0, progress_bar)
        row, vals = score_epoch(run, epoch, stats, t0)
        progress.history.append(row)
        if ranks.main:
            write_history(progress.history, out_dir)
            for name, v in row.items():
                if isinstance(v, (int, float)) and name != "epoch":
                    run.writer.add_scalar(f"epoch/{name}", v, epoch + 1)
        log(epoch_line(row, epochs, vals, cfg.train.val_contexts[0]))
        keep_checkpoints(run, progress, vals, epoch)
        progress.epoch, progress.step, progress.elapsed_s = epoch + 1, 0, time.time() - t0
        write_resume_state(
            out_dir / RESUME_FILE, run_config, progress, {}, module, run.opt, run.scaler, ranks
        )
    digests = [tensors_digest(module.state_dict())]
    if ranks.distributed:
        sync_buffers(module, ranks)
        digests = [""] * ranks.world_size
        dist.all_gather_object(digests, tensors_digest(module.state_dict()))
        if len(set(digests)) != 1:
            raise FprotosegError(f"the {ranks.world_size} ranks ended with different weights: {digests}")
    run.writer.close()
    result = {
        "best_miou": progress.best_miou,
        "checkpoint": str(run.checkpoint_path),
        "history": str(out_dir / "history.csv"),
        "resume_state": str(out_dir / RESUME_FILE),
        "world_size": ranks.world_size,
        "rank_state_sha256": digests,
    }
    if ranks.main:
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
    return result


__all__ = ["ConfigError", "Run", "build_data", "setup_run", "train"]
