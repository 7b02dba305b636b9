"""Crop mIoU and whole-slide mIoU of a checkpoint on the same validation crops, side by side.

Why: a network can score well crop by crop and still paint a slide wrong (a tile that straddles
two crops or glass sees a context it never saw in training). This lays the validation crops out as
one pyramidal slide with ``../shared/tools/mosaic.py``, runs ``fprotoseg segment`` on it exactly as
a lab would, scores the GeoJSON against the crops' masks with ``../shared/tools/geojson_check.py``,
and prints one JSON object with both figures (and their gap) beside the crop-level ``evaluate``.

    python bench/mosaic_eval.py --checkpoint runs/x/best.safetensors            # the config's split
    python bench/mosaic_eval.py --names 00.png,02.png --data-root DIR           # any crops
    python bench/mosaic_eval.py --dataset bcss-wsss --checkpoint fprotoseg_bcss_wsss \
        --data-root ../shared/data/bcss_wsss/valid                              # BCSS-WSSS valid

The mosaic is declared at the checkpoint's µm/px (the crops are scanned at that resolution). The
mIoU is over the classes present in the masks (``miou_present``, the BCSS-WSSS figure) and, for
WSSS4LUAD, over all three classes as well (they are all present in its split).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO.parent / "shared" / "tools"
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "masks" / "wsss4luad" / "test"


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip())[-800:]  # geojson_check reports on stdout
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {said}")
    return proc.stdout


def mosaic_size(mosaic_stdout: str) -> tuple[int, int]:
    """(width, height) in px from mosaic.py's ``PREFIX.tiff WxH mpp=...`` line. Anchored on
    ``.tiff`` and ``mpp=``: a temporary folder's random name (``fprotoseg-cv-if2y1x0t``) holds
    ``1x0`` too, and a slide checked against 1 x 0 px breaks every coordinate rule."""
    found = re.search(r"\.tiff (\d+)x(\d+) mpp=", mosaic_stdout)
    if found is None:
        raise SystemExit(f"mosaic.py printed no size: {mosaic_stdout.strip()[-400:]}")
    return int(found.group(1)), int(found.group(2))


# geojson_check.py matches a polygon's class by case-insensitive substring of these
CHECK_CLASSES = {"wsss4luad": "tumo,stroma,normal", "bcss-wsss": "tumo,stroma,lymph,necros"}


def slide_scores(
    checkpoint: Path | str | None,
    data_root: Path,
    names: list[str],
    work: Path,
    dataset: str = "wsss4luad",
    mpp: float = 1.0,
) -> dict:
    """Mosaic slide from the named crops -> fprotoseg segment -> per-class IoU of the polygons."""
    img, mask = work / "img", work / "mask"
    img.mkdir()
    mask.mkdir()
    for n in names:
        (img / n).symlink_to((data_root / "img" / n).resolve())
        (mask / n).symlink_to((data_root / "mask" / n).resolve())
    mosaic = [sys.executable, str(TOOLS / "mosaic.py"), str(img), str(mask), str(work / "mosaic")]
    out = _run([*mosaic, "--mpp", str(mpp)])
    width, height = mosaic_size(out)
    cmd = [sys.executable, "-m", "fprotoseg.app.cli", "segment", str(work / "mosaic.tiff")]
    cmd += ["--out", str(work / "out")]
    if checkpoint is not None:
        cmd += ["--checkpoint", str(checkpoint)]
    _run(cmd)
    check = _run(
        [
            sys.executable,
            str(TOOLS / "geojson_check.py"),
            str(work / "out" / "segmentation.geojson"),
            "--width",
            str(width),
            "--height",
            str(height),
            "--gt",
            str(work / "mosaic.gt.png"),
            "--classes",
            CHECK_CLASSES[dataset],
        ]
    )
    iou = [float(v) for v in re.search(r"iou=([\d.,]+)", check).group(1).split(",")]
    miou = float(re.search(r"miou=([\d.]+)", check).group(1))
    gt = np.asarray(Image.open(work / "mosaic.gt.png"))
    present = [bool((gt == k).any()) for k in range(len(iou))]
    miou_present = float(np.mean([v for v, here in zip(iou, present, strict=True) if here]))
    return {
        "miou": miou,
        "miou_present": miou_present,
        "iou": iou,
        "present": present,
        "check": check.strip(),
    }


def main(argv: list[str] | None = None) -> int:
    from fprotoseg.model.training.evaluate import evaluate_checkpoint, heldout_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="a path or a packaged name (default: the default)")
    ap.add_argument("--dataset", default="wsss4luad", choices=sorted(CHECK_CLASSES))
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--names", default=None, help="comma-separated crop names (default: the config's split)")
    args = ap.parse_args(argv)
    if args.checkpoint is not None:
        from fprotoseg.model.catalog import resolve_checkpoint

        args.checkpoint = resolve_checkpoint(args.checkpoint)
    if args.names:
        names = args.names.split(",")
    elif args.dataset == "wsss4luad" and args.data_root == DEFAULT_ROOT:
        names = heldout_names(args.checkpoint)
    else:
        names = sorted(p.name for p in (args.data_root / "img").glob("*.png"))
    from fprotoseg.model import DEFAULT_CHECKPOINT
    from fprotoseg.model.catalog import read_manifest

    mpp = float(read_manifest(Path(args.checkpoint or DEFAULT_CHECKPOINT))["mpp"])  # header only
    crop = evaluate_checkpoint(args.checkpoint, args.data_root, args.dataset, names)
    with tempfile.TemporaryDirectory(prefix="fprotoseg-mosaic-") as tmp:
        slide = slide_scores(args.checkpoint, args.data_root, names, Path(tmp), args.dataset, mpp)
    key = "miou" if args.dataset == "wsss4luad" else "miou_present"
    result = {
        "checkpoint": crop["checkpoint"],
        "dataset": args.dataset,
        "images": len(names),
        "mpp": mpp,
        "figure": key,
        "crop_miou": round(crop[key], 4),
        "crop_iou": {k: round(v, 4) for k, v in crop["iou"].items()},
        "slide_miou": round(slide[key], 4),
        "slide_iou": dict(zip(crop["iou"], slide["iou"], strict=True)),
        "classes_present": dict(zip(crop["iou"], slide["present"], strict=True)),
        "gap": round(crop[key] - slide[key], 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
