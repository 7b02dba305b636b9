"""Package a trained run as the default checkpoint, with its held-out scores in the manifest.

Why a step of its own: the model card quotes the manifest, so the numbers in it must come from
the same code path as ``fprotoseg evaluate`` (the worker's seam, tiled like a slide) and sit beside
the floors any model must beat on the same images (best constant, colour threshold).

    python -m fprotoseg.model.training.package runs/wsss4luad_default/final.safetensors  # -> model/weights/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint

KEYS = ("miou", "iou", "fwiou", "dice", "images", "protocol")


def heldout_metrics(checkpoint: Path, data_root: Path) -> dict[str, Any]:
    """The run's held-out scores (crops mirrored and crops on glass) and the two floors, on the
    split its config records."""
    from fprotoseg.model.training.datasets import load_pairs
    from fprotoseg.model.training.evaluate import (
        best_constant,
        colour_threshold_labels,
        evaluate_checkpoint,
        heldout_names,
        score_pairs,
    )

    names = heldout_names(checkpoint)
    scores = evaluate_checkpoint(checkpoint, data_root, "wsss4luad", names)
    glass = evaluate_checkpoint(checkpoint, data_root, "wsss4luad", names, context="glass")
    pairs = load_pairs(data_root, names)
    constant = best_constant(pairs, "wsss4luad")
    colour = score_pairs(pairs, lambda p: colour_threshold_labels(p.rgb), "wsss4luad")
    return {
        "heldout_wsss4luad": {k: scores[k] for k in KEYS},
        "heldout_wsss4luad_on_glass": {k: glass[k] for k in ("miou", "iou", "images")},
        "heldout_best_constant": {
            "class": constant["constant"],
            "miou": constant["miou"],
            "iou": constant["iou"],
        },
        "heldout_colour_threshold": {"miou": colour["miou"], "iou": colour["iou"]},
    }


def validation_metrics(checkpoint: Path, dataset: str, data_root: Path) -> dict[str, Any]:
    """Scores on a dataset's own validation pairs (BCSS-WSSS: another slide than training)."""
    from fprotoseg.model.training.datasets import load_pairs
    from fprotoseg.model.training.evaluate import best_constant, evaluate_checkpoint

    scores = evaluate_checkpoint(checkpoint, data_root, dataset)
    constant = best_constant(load_pairs(data_root), dataset)
    key = dataset.replace("-", "_")
    return {
        f"validation_{key}": {k: scores[k] for k in (*KEYS, "miou_present")},
        f"validation_{key}_best_constant": {"class": constant["constant"], "miou": constant["miou"]},
    }


def package(
    checkpoint: Path, data_root: Path | None, out: Path, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write ``out`` = the run's weights + manifest with measured scores (and ``extra`` figures
    measured elsewhere: seeds, the mosaic slide), so the model card quotes the file itself."""
    from fprotoseg.model.config_schema import resolve_path

    state, manifest = read_checkpoint(checkpoint)
    # fp16 storage halves the file (the 20 MB budget of a packaged model); scores are measured on
    # the written fp16 file itself, not on the fp32 run it came from
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = save_checkpoint(out.with_suffix(".staged.safetensors"), state, manifest)
    data_cfg = manifest.get("config", {}).get("data", {})
    try:
        if data_cfg.get("holdout"):
            metrics = heldout_metrics(staged, data_root or resolve_path(data_cfg["pairs_root"]))
        else:
            root = data_root or resolve_path(data_cfg["val_root"])
            metrics = validation_metrics(staged, data_cfg.get("dataset", "wsss4luad"), root)
    finally:
        staged.unlink(missing_ok=True)
    metrics["selected_epoch"] = manifest.get("metrics", {}).get("epoch")
    metrics["kept"] = manifest.get("metrics", {}).get("kept", "best")
    metrics.update(extra or {})
    manifest = {**manifest, "metrics": metrics}
    save_checkpoint(out, state, manifest)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from fprotoseg.model import DEFAULT_CHECKPOINT

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data-root", type=Path, default=None, help="default: the run config's data")
    ap.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument(
        "--extra", type=Path, default=None, help="JSON object of figures measured elsewhere (seeds, mosaic)"
    )
    args = ap.parse_args(argv)
    extra = json.loads(args.extra.read_text()) if args.extra else None
    metrics = package(args.checkpoint, args.data_root, args.out, extra)
    key = next(k for k in metrics if k in ("heldout_wsss4luad",) or k.startswith("validation_"))
    h = metrics[key]
    print(
        f"{args.out}: {key} mIoU {h['miou']:.4f} "
        + " ".join(f"{k}={v:.3f}" for k, v in h["iou"].items() if v is not None)
        + f" ({h['images']} images; {args.out.stat().st_size / 2**20:.1f} MiB)"
    )
    return 0 if np.isfinite(h["miou"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
