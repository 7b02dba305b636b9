"""Train the file that ships: a cross-validated recipe, retrained on every labelled unit.

Why separate from the CV runs: the folds chose the recipe; the shipped file then learns from all
the data (more Normal, more stain variety) and carries, in its manifest, the cross-validated
figures of its recipe and of the baseline — never a score on data it was trained on. ``GET
/models`` and the model card show those figures.

    python -m fprotoseg.model.training.ship model/recipes/cam_cnn_glass_jpeg.yaml \
        --baseline model/recipes/cam_cnn_baseline.yaml --cv bench/results/cv_wsss4luad.jsonl \
        --inference-cv bench/results/cv_inference_glass_jpeg.json --views 4 \
        --out model/weights/fprotoseg_wsss4luad.safetensors
    python -m fprotoseg.model.training.ship model/recipes/bcss_cam_cnn_stain.yaml --plan cv_bcss_wsss \
        --baseline model/recipes/bcss_cam_cnn_baseline.yaml --cv runs/cv/cv_bcss_wsss.jsonl \
        --name fprotoseg-bcss-wsss-cam-cnn --out model/weights/fprotoseg_bcss_wsss.safetensors
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from fprotoseg.model.checkpoint import save_checkpoint
from fprotoseg.model.networks.cam_cnn import CamCnn
from fprotoseg.model.training.cam_cnn import CamCnnRecipe, manifest_for, restain, train
from fprotoseg.model.training.cv import CvResult, load_units, presence_f1, read_plan
from fprotoseg.model.training.datasets import DATASETS, DatasetError

# What a dataset's shipped file says about where it comes from (the model's domain and its data).
ORGANS = {"wsss4luad": ["lung"], "bcss-wsss": ["breast"]}
DATA = {
    "wsss4luad": "the 67 masked crops of ../shared/data/masks/wsss4luad/test",
    "bcss-wsss": "the 238 training patches (image-level labels) and 14 masked validation patches of "
    "../shared/data/bcss_wsss, three TCGA slides",
}

DEFAULT_SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def cv_summary(cv_jsonl: Path, recipe_name: str, classes: tuple[str, ...]) -> dict[str, Any]:
    """The CV figures of one recipe from a ``bench/cv.py`` results file (refuses a missing one)."""
    runs = [json.loads(line) for line in cv_jsonl.read_text().splitlines() if line.strip()]
    mine = [r for r in runs if r["recipe"] == recipe_name]
    masked = [r for r in mine if np.asarray(r["confusion"]).sum() > 0]
    if not masked:
        raise DatasetError(f"{cv_jsonl} has no cross-validation runs of recipe {recipe_name!r}")
    summary = CvResult(classes, {(r["seed"], r["fold"]): np.array(r["confusion"]) for r in masked}).summary()
    label_only = [np.asarray(r["presence"]) for r in mine if np.asarray(r.get("presence", 0)).sum() > 0]
    if label_only:  # folds of slides without masks: image-level F1 of the classes found per image
        f1 = presence_f1(np.sum(np.stack(label_only), axis=0))
        summary["image_f1_label_only_folds"] = {
            c: round(float(v), 4) for c, v in zip(classes, f1, strict=True) if not np.isnan(v)
        }
    slides = [r["slide_miou_present"] for r in mine if "slide_miou_present" in r]
    if slides:
        summary["slide_folds_miou_mean"] = float(np.mean(slides))
        summary["slide_folds_miou_sd"] = float(np.std(slides))
    summary.pop("confusion")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}


def inference_summary(path: Path, views: int, prior: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's ``inference`` section and its CV figures from a ``bench/cv_inference.py`` file.

    The prior shipped is the one chosen on every fold's out-of-fold scores; the figures quoted for
    it are the nested ones (each fold scored with a prior chosen on the other folds)."""
    table = json.loads(path.read_text())
    row = table["views"].get(str(views))
    if row is None:
        raise DatasetError(f"{path} has no figures for {views} views")
    inference: dict[str, Any] = {"dihedral_views": views}
    figures: dict[str, Any] = {"recipe": table["recipe"], "dihedral_views": views, "runs": table["runs"]}
    if prior:
        inference["class_log_prior"] = row["prior_on_all_folds"]
        figures |= {"folds_miou_mean": row["nested_prior_mean"], "folds_miou_sd": row["nested_prior_sd"]}
        figures["class_log_prior_nested_per_fold"] = row["nested_prior_chosen"]
    else:
        figures |= {"folds_miou_mean": row["mean"], "folds_miou_sd": row["sd"], "pooled_miou": row["pooled"]}
    slide = table.get("slide")
    if slide and slide["views"] == views and slide["nested_prior"] == prior:
        figures |= {"slide_folds_miou_mean": slide["mean"], "slide_folds_miou_sd": slide["sd"]}
    return inference, {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument(
        "--baseline", type=Path, required=True, help="the baseline recipe the CV compared against"
    )
    ap.add_argument("--cv", type=Path, required=True, help="bench/cv.py results (JSON lines)")
    ap.add_argument("--plan", default="cv_wsss4luad")
    ap.add_argument("--shared-data", type=Path, default=DEFAULT_SHARED_DATA)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="fprotoseg-wsss4luad-cam-cnn")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="skip training: a torch state dict of this recipe already trained on every unit",
    )
    ap.add_argument(
        "--inference-cv",
        type=Path,
        default=None,
        help="bench/cv_inference.py results: ship the view count (--views) and, with --prior, the "
        "class log-prior chosen there, with their cross-validated figures",
    )
    ap.add_argument("--views", type=int, default=1, help="with --inference-cv: dihedral views to ship")
    ap.add_argument("--prior", action="store_true", help="with --inference-cv: ship the class log-prior")
    args = ap.parse_args(argv)

    recipe = CamCnnRecipe.from_yaml(args.recipe)
    baseline = CamCnnRecipe.from_yaml(args.baseline)
    plan = read_plan(args.plan, args.shared_data)
    if plan.dataset not in ORGANS:
        raise DatasetError(f"no shipping description for dataset {plan.dataset!r}")
    if recipe.mpp != plan.mpp:
        raise DatasetError(f"{recipe.name} runs at {recipe.mpp} µm/px, the plan {args.plan} at {plan.mpp}")
    spec = DATASETS[plan.dataset]
    classes = spec.qupath_names
    units = load_units(plan)
    images, stain = restain([u.train_image() for u in units], recipe)  # deterministic: also for --weights
    if args.weights is None:
        net = train(images, recipe, args.seed, num_classes=len(classes))
    else:
        import torch

        net = CamCnn(len(classes), recipe.channels, recipe.strides)
        net.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    # the CV figures are read after training, so runs that ended meanwhile count too
    metrics = {
        "cv_protocol": f"{plan.num_folds}-fold cross-validation"
        + (" leaving one slide out" if plan.by_prefix else "")
        + f", folds fixed in model/recipes/{args.plan}.yaml; "
        "crop mIoU over the classes present, ground-truth background ignored; whole slide = each fold's "
        "held-out units as one mosaic slide through fprotoseg segment (bench/cv.py)",
        "cv_recipe": cv_summary(args.cv, recipe.name, classes),
        "cv_baseline": cv_summary(args.cv, baseline.name, classes),
        "scored_on_training_data": False,
    }
    inference = None
    if args.inference_cv is not None:
        inference, metrics["cv_inference"] = inference_summary(args.inference_cv, args.views, args.prior)
    manifest = manifest_for(
        recipe,
        list(zip(classes, spec.colors, strict=True)),
        name=args.name,
        training={
            "data": f"all {len(units)} units of model/recipes/{args.plan}.yaml ({DATA[plan.dataset]}); "
            "crop-level labels only: the image's label, or the classes above "
            f"{recipe.label_fraction:.0%} of each random {recipe.crop_px} px crop of a masked image",
            "supervision": "crop-level (image-level) labels derived from masks; masks never reach a loss",
            "seed": args.seed,
            "steps": recipe.steps,
        },
        domain={"organ": ORGANS[plan.dataset], "stain": "H&E", "mpp": recipe.mpp, "classes": list(classes)},
        **stain,
        metrics=metrics,
        **({"inference": inference} if inference else {}),
    )
    state = {k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}
    save_checkpoint(args.out, state, manifest)
    print(json.dumps({"out": str(args.out), "metrics": metrics}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
