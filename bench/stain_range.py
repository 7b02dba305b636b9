"""Measure the stain range of a model's training crops and store it beside the checkpoint.

Why: slide QC (``fprotoseg.worker.wsi.qc``) compares a slide's haematoxylin and eosin vectors with
what the model was trained on; that range is a property of the training data, measured once here,
shipped as ``model/weights/<checkpoint stem>.qc.json`` (package data) and matched to the network
by its checkpoint's sha256. Each crop is resampled from ``--crop-mpp`` to ``--at-mpp`` (the
resolution QC reads slides at: the default output µm/px), its stain vectors are estimated with
the same function QC uses on a slide (:func:`~fprotoseg.model.stain_norm.stain_vectors`), and the
range is the mean vector per stain with the largest angle any crop has to it plus ``--margin-deg``.

    python bench/stain_range.py --checkpoint model/weights/fprotoseg_wsss4luad.safetensors \\
        --crops ../shared/data/masks/wsss4luad/test/img ../shared/data/patches/wsss4luad_train --crop-mpp 1.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def crop_vectors(path: Path, crop_mpp: float, at_mpp: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(haematoxylin, eosin) of one crop at ``at_mpp``, None if it has too little stained tissue."""
    import cv2
    from PIL import Image

    from fprotoseg.model.stain_norm import STAINED_MIN_OD, stain_vectors

    rgb = np.asarray(Image.open(path).convert("RGB"))
    scale = crop_mpp / at_mpp
    if scale < 1:
        size = (max(1, round(rgb.shape[1] * scale)), max(1, round(rgb.shape[0] * scale)))
        rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    od = -np.log(np.maximum(rgb, 1).astype(np.float32) / 255.0)
    return stain_vectors(od[od.sum(axis=2) > STAINED_MIN_OD])


def main() -> None:
    from fprotoseg.model.catalog import read_manifest
    from fprotoseg.model.segmenter import file_sha256
    from fprotoseg.worker.wsi.qc import angle_deg, reference_path

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--crops", type=Path, nargs="+", required=True, help="folders of training crops")
    ap.add_argument("--crop-mpp", type=float, required=True, help="µm/px of the crops")
    ap.add_argument("--at-mpp", type=float, default=2.0, help="µm/px QC reads slides at (default 2.0)")
    ap.add_argument("--margin-deg", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=None, help="default: beside the checkpoint")
    args = ap.parse_args()

    paths = sorted(p for d in args.crops for p in d.iterdir() if p.suffix.lower() in (".png", ".jpg", ".tif"))
    found = [v for v in (crop_vectors(p, args.crop_mpp, args.at_mpp) for p in paths) if v is not None]
    if not found:
        raise SystemExit("no crop had enough stained tissue")
    stains = {}
    for i, stain in enumerate(("haematoxylin", "eosin")):
        vecs = np.array([v[i] for v in found])
        mean = vecs.mean(axis=0)
        mean /= np.linalg.norm(mean)
        angles = [angle_deg(v, mean) for v in vecs]
        stains[stain] = {
            "mean": [round(float(x), 4) for x in mean],
            "max_observed_deg": round(max(angles), 2),
            "p95_observed_deg": round(float(np.percentile(angles, 95)), 2),
            "max_angle_deg": round(max(angles) + args.margin_deg, 2),
        }
    manifest = read_manifest(args.checkpoint)
    doc = {
        "what": "stain range of the training crops for slide QC (bench/stain_range.py)",
        "manifest_name": manifest.get("name"),
        "checkpoint_sha256": file_sha256(args.checkpoint),
        "mpp": args.at_mpp,
        "crop_mpp": args.crop_mpp,
        "crops": len(paths),
        "crops_used": len(found),
        "crop_folders": [d.name for d in args.crops],
        "margin_deg": args.margin_deg,
        "stains": stains,
    }
    out = args.out or reference_path(args.checkpoint)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(f"written: {out}")


if __name__ == "__main__":
    main()
