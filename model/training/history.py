"""A training run's history: ``history.csv`` (one row per epoch), ``history.png`` and, with
``train.tensorboard``, TensorBoard event files beside them.

Why a module of its own: what a run records about itself is read by people and tools (docs,
bench/), and should not change when the loop that produces the rows does.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Protocol

from fprotoseg.model.errors import ConfigurationError


class ScalarWriter(Protocol):
    """What the trainer asks of a TensorBoard SummaryWriter."""

    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def close(self) -> None: ...


class _NoWriter:
    def add_scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def tensorboard_writer(enabled: bool, log_dir: Path | None) -> ScalarWriter:
    """A SummaryWriter when ``train.tensorboard`` is on (optional dependency), else a no-op;
    ``log_dir`` None (not rank 0): a no-op too."""
    if not enabled:
        return _NoWriter()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigurationError(
            "train.tensorboard is true but the tensorboard package is not installed "
            "(pip install tensorboard, or set train.tensorboard: false)"
        ) from None
    if log_dir is None:
        return _NoWriter()
    writer: ScalarWriter = SummaryWriter(str(log_dir))
    return writer


def write_history(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """``history.csv`` (every column any row has) and ``history.png``, rewritten each epoch."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out_dir / "history.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot_history(rows, out_dir / "history.png")


def plot_history(rows: list[dict[str, Any]], path: Path) -> None:
    """Loss and validation mIoU per epoch as a PNG (PIL only: no plotting library needed)."""
    from PIL import Image, ImageDraw

    w, h, m = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle((m, m, w - m, h - m), outline="black")
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
            d.ellipse((p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3), fill=colour)
    d.text(
        (m, 10), f"red: train loss (max {lmax:.3f})   blue: val mIoU (best {max(mious):.3f})", fill="black"
    )
    d.text((m, h - m + 8), f"epochs 1..{n}", fill="black")
    img.save(path)


def epoch_line(row: dict[str, Any], epochs: int, vals: dict[str, dict[str, Any]], first: str) -> str:
    """The log line of one epoch: loss, validation mIoU per class and context, pseudo-mask mIoU,
    throughput."""
    val = vals[first]
    return (
        f"epoch {row['epoch']}/{epochs} loss {row['train_loss']:.4f} val mIoU {val['miou']:.4f} "
        + " ".join(f"{n}={v:.3f}" for n, v in val["iou"].items() if v is not None)
        + "".join(f" {c} {v['miou']:.4f}" for c, v in vals.items() if c != first)
        + (f" pseudo {row['val_pseudo_miou']:.4f}" if "val_pseudo_miou" in row else "")
        + f" | train {row['train_img_s']:.1f} img/s, loader {row['load_img_s']:.1f} img/s,"
        f" waiting {row['data_wait_frac']:.0%} ({row['elapsed_s']:.0f}s)"
    )


__all__ = ["ScalarWriter", "epoch_line", "plot_history", "tensorboard_writer", "write_history"]
