"""Package a trained run as the default checkpoint, with its held-out scores in the manifest.

Why a step of its own: the model card quotes the manifest, so the numbers in it must come from
the same code path as ``fprotoseg evaluate`` (the worker's seam, tiled like a slide) and sit beside
the floors any model must beat on the same images (best constant, colour threshold).

    python -m fprotoseg.model.package runs/wsss4luad_stage2/best.safetensors   # -> model/weights/...
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint

KEYS = ("miou", "iou", "fwiou", "dice", "images", "protocol")


def heldout_metrics(checkpoint: Path, data_root: Path) -> dict[str, Any]:
    """The run's held-out scores and the two floors, on the split its config records."""
    from fprotoseg.model.datasets import load_pairs
    from fprotoseg.model.evaluate import (
        best_constant,
        colour_threshold_labels,
        evaluate_checkpoint,
        heldout_names,
        score_pairs,
    )

    names = heldout_names(checkpoint)
    scores = evaluate_checkpoint(checkpoint, data_root, "wsss4luad", names)
    pairs = load_pairs(data_root, names)
    constant = best_constant(pairs, "wsss4luad")
    colour = score_pairs(pairs, lambda p: colour_threshold_labels(p.rgb), "wsss4luad")
    return {
        "heldout_wsss4luad": {k: scores[k] for k in KEYS},
        "heldout_best_constant": {
            "class": constant["constant"],
            "miou": constant["miou"],
            "iou": constant["iou"],
        },
        "heldout_colour_threshold": {"miou": colour["miou"], "iou": colour["iou"]},
    }


def package(checkpoint: Path, data_root: Path, out: Path) -> dict[str, Any]:
    state, manifest = read_checkpoint(checkpoint)
    metrics = heldout_metrics(checkpoint, data_root)
    metrics["selected_epoch"] = manifest.get("metrics", {}).get("epoch")
    manifest = {**manifest, "metrics": metrics}
    save_checkpoint(out, state, manifest)
    return metrics


def main(argv: list[str] | None = None) -> int:
    from fprotoseg.model import DEFAULT_CHECKPOINT

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data/masks/wsss4luad/test"))
    ap.add_argument("--out", type=Path, default=DEFAULT_CHECKPOINT)
    args = ap.parse_args(argv)
    metrics = package(args.checkpoint, args.data_root, args.out)
    h = metrics["heldout_wsss4luad"]
    print(
        f"{args.out}: held-out mIoU {h['miou']:.4f} "
        + " ".join(f"{k}={v:.3f}" for k, v in h["iou"].items())
        + f" ({h['images']} images; {args.out.stat().st_size / 2**20:.1f} MiB)"
    )
    return 0 if np.isfinite(h["miou"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
