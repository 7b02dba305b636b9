"""Crop mIoU and whole-slide mIoU of a checkpoint on the same validation crops, side by side.

Why: a network can score well crop by crop and still paint a slide wrong (a tile that straddles
two crops or glass sees a context it never saw in training). This lays the validation crops out as
one pyramidal slide with ``../shared/tools/mosaic.py``, runs ``fprotoseg segment`` on it exactly as
a lab would, scores the GeoJSON against the crops' masks with ``../shared/tools/geojson_check.py``,
and prints one JSON object with both figures (and their gap) beside the crop-level ``evaluate``.

    python bench/mosaic_eval.py --checkpoint runs/x/best.safetensors            # the config's split
    python bench/mosaic_eval.py --names 00.png,02.png --data-root DIR           # any crops
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO.parent / "shared" / "tools"
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "masks" / "wsss4luad" / "test"


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return proc.stdout


def slide_scores(checkpoint: Path | None, data_root: Path, names: list[str], work: Path) -> dict:
    """Mosaic slide from the named crops -> fprotoseg segment -> per-class IoU of the polygons."""
    img, mask = work / "img", work / "mask"
    img.mkdir()
    mask.mkdir()
    for n in names:
        (img / n).symlink_to((data_root / "img" / n).resolve())
        (mask / n).symlink_to((data_root / "mask" / n).resolve())
    out = _run([sys.executable, str(TOOLS / "mosaic.py"), str(img), str(mask), str(work / "mosaic")])
    width, height = (int(v) for v in re.search(r"(\d+)x(\d+)", out).groups())
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
        ]
    )
    iou = [float(v) for v in re.search(r"iou=([\d.,]+)", check).group(1).split(",")]
    miou = float(re.search(r"miou=([\d.]+)", check).group(1))
    return {"miou": miou, "iou": iou, "check": check.strip()}


def main(argv: list[str] | None = None) -> int:
    from fprotoseg.model.evaluate import evaluate_checkpoint, heldout_names

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the packaged model")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--names", default=None, help="comma-separated crop names (default: the config's split)")
    args = ap.parse_args(argv)
    names = args.names.split(",") if args.names else heldout_names(args.checkpoint)
    crop = evaluate_checkpoint(args.checkpoint, args.data_root, "wsss4luad", names)
    with tempfile.TemporaryDirectory(prefix="fprotoseg-mosaic-") as tmp:
        slide = slide_scores(args.checkpoint, args.data_root, names, Path(tmp))
    result = {
        "checkpoint": crop["checkpoint"],
        "images": len(names),
        "crop_miou": round(crop["miou"], 4),
        "crop_iou": {k: round(v, 4) for k, v in crop["iou"].items()},
        "slide_miou": round(slide["miou"], 4),
        "slide_iou": dict(zip(crop["iou"], slide["iou"], strict=True)),
        "gap": round(crop["miou"] - slide["miou"], 4),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
