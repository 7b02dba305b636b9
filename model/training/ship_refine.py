"""Add the cross-validated guided refinement to a shipped file: its weights untouched.

Why separate from :mod:`ship`: the refinement has no weights. It was chosen on the fold networks of
the file's own recipe (``bench/cv_inference.py --refine``), so the shipped network is not retrained
and its other CV figures stay as they were; the manifest gains the ``guided_refine`` the folds
chose, the tile size it was scored with, and its nested CV figures beside those without it.

    python -m fprotoseg.model.training.ship_refine model/weights/fprotoseg_wsss4luad.safetensors \
        --refine-cv bench/results/cv_refine_glass_jpeg.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path
from typing import Any

from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint
from fprotoseg.model.training.datasets import DatasetError


def refine_summary(path: Path) -> dict[str, Any]:
    """The figures of a ``bench/cv_inference.py --refine`` file: the ``guided_refine`` chosen on all
    folds' out-of-fold scores, the views and tile size it was scored with, and the nested figures
    (each fold scored with the grid point chosen on the other folds) beside those without it."""
    table = json.loads(path.read_text())["refine"]
    key = table["chosen_on_all_folds"]
    if key == "none":
        raise DatasetError(f"{path}: the folds chose no refinement; nothing to ship")
    refine = dict(table["grid_points"][key])
    figures: dict[str, Any] = {
        "guided_refine": refine,
        "dihedral_views": table["views"],
        "tile_size_px": table["refine_tile_size_px"],
        "chosen_nested_per_fold": table["nested_chosen"],
        "folds_miou_mean": table["nested_mean"],
        "folds_miou_sd": table["nested_sd"],
        "without_refine_folds_miou_mean": table["grid"]["none"]["mean"],
        "without_refine_folds_miou_sd": table["grid"]["none"]["sd"],
    }
    slide = table.get("slide")
    if slide:
        figures |= {
            "slide_folds_miou_mean": slide["nested"]["mean"],
            "slide_folds_miou_sd": slide["nested"]["sd"],
            "without_refine_slide_folds_miou_mean": slide["none"]["mean"],
            "without_refine_slide_folds_miou_sd": slide["none"]["sd"],
        }
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def add_refinement(manifest: dict[str, Any], refine_cv: Path) -> dict[str, Any]:
    """A copy of ``manifest`` with the refinement, its tile size and its figures added."""
    figures = refine_summary(refine_cv)
    views = int((manifest.get("inference") or {}).get("dihedral_views", 1))
    if views != figures["dihedral_views"]:
        raise DatasetError(
            f"{refine_cv} was scored with {figures['dihedral_views']} views, the file uses {views}"
        )
    out = copy.deepcopy(manifest)
    out["inference"] = {**(out.get("inference") or {}), "guided_refine": dict(figures["guided_refine"])}
    if figures["tile_size_px"] is not None:
        out["tile_size_px"] = int(figures["tile_size_px"])
    out.setdefault("metrics", {})["cv_refine"] = figures
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", type=Path, help="the shipped file (rewritten in place unless --out)")
    ap.add_argument("--refine-cv", type=Path, required=True, help="bench/cv_inference.py --refine results")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    state, manifest = read_checkpoint(args.checkpoint)
    manifest = add_refinement(manifest, args.refine_cv)
    save_checkpoint(args.out or args.checkpoint, state, manifest)
    print(
        json.dumps(
            {
                "out": str(args.out or args.checkpoint),
                "inference": manifest["inference"],
                "cv_refine": manifest["metrics"]["cv_refine"],
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
