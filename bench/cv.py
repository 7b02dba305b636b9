"""Cross-validate CAM-CNN recipes on fixed folds and print the table (the one way to choose).

For every recipe, seed and fold: train on the other folds' units, save the fold's checkpoint,
predict the held-out units through the service's own seam (``load_segmenter`` + the tiling of
``fprotoseg evaluate``), and keep the out-of-fold confusion matrix. With ``--slide`` each fold's
held-out units are also laid out as one pyramidal slide (``../shared/tools/mosaic.py``), run
through ``fprotoseg segment`` and scored by ``../shared/tools/geojson_check.py``: the whole-slide
figure beside the crop figure. Results are kept per run in ``--out`` (a rerun skips what is done).

    python bench/cv.py model/recipes/cam_cnn_baseline.yaml model/recipes/cam_cnn_stain.yaml \
        --seeds 0 --jobs 2 --slide
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def _run_fold(
    recipe_path: str, plan_name: str, seed: int, fold: int, out_dir: str, threads: int
) -> dict[str, Any]:
    """Train one (recipe, seed, fold), save its checkpoint, score its held-out units."""
    import torch

    torch.set_num_threads(threads)
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.checkpoint import save_checkpoint
    from fprotoseg.model.stain_norm import normalise_image
    from fprotoseg.model.training.cam_cnn import CamCnnRecipe, manifest_for, restain, train
    from fprotoseg.model.training.cv import (
        load_units,
        predicted_presence,
        presence_counts,
        read_plan,
        unit_confusion,
    )
    from fprotoseg.model.training.datasets import DATASETS
    from fprotoseg.model.training.evaluate import predict_labels

    recipe = CamCnnRecipe.from_yaml(recipe_path)
    plan = read_plan(plan_name, SHARED_DATA)
    if recipe.mpp != plan.mpp:
        raise SystemExit(f"{recipe.name} runs at {recipe.mpp} µm/px, the plan {plan_name} at {plan.mpp}")
    spec = DATASETS[plan.dataset]
    classes = list(zip(spec.qupath_names, spec.colors, strict=True))
    k = len(classes)
    units = load_units(plan)
    train_units = [u for u in units if u.fold != fold]
    test_units = [u for u in units if u.fold == fold]
    t0 = time.perf_counter()
    images, stain = restain([u.train_image() for u in train_units], recipe)
    cv = {"plan": plan_name, "seed": seed, "fold": fold, "trained_on": len(train_units)}
    stage1_ckpt = Path(out_dir) / f"{recipe.name}_s{seed}_f{fold}_stage1.safetensors"

    def keep_stage1(net1: Any) -> None:  # the same run without stage 2, for a paired comparison
        recipe1 = replace(recipe, stage2_steps=0)
        save_checkpoint(stage1_ckpt, net1.state_dict(), manifest_for(recipe1, classes, cv=cv, **stain))

    net = train(images, recipe, seed, num_classes=k, after_stage1=keep_stage1)
    train_s = time.perf_counter() - t0
    ckpt = Path(out_dir) / f"{recipe.name}_s{seed}_f{fold}.safetensors"
    manifest = manifest_for(recipe, classes, cv=cv, **stain)
    save_checkpoint(ckpt, net.state_dict(), manifest)
    seg = load_segmenter(ckpt, device="cpu")
    cm = np.zeros((k, k), np.int64)
    presence = np.zeros((k, 3), np.int64)
    for u in test_units:
        labels = predict_labels(seg.predict, normalise_image(seg.manifest, u.rgb), seg.tile_size_px)
        if u.mask is not None:
            cm += unit_confusion(u.mask, labels, plan.dataset)
        else:
            assert u.label is not None
            presence += presence_counts(u.label, predicted_presence(labels, k, plan.min_label_fraction))
    return {
        "recipe": recipe.name,
        "seed": seed,
        "fold": fold,
        "confusion": cm.tolist(),
        "presence": presence.tolist(),
        "train_s": round(train_s, 1),
        "checkpoint": str(ckpt),
        **({"stage1_checkpoint": str(stage1_ckpt)} if recipe.stage2_steps > 0 else {}),
        "units": [u.name for u in test_units],
    }


def _write_fold_data(units: list[Any], root: Path) -> list[str]:
    """The units as an img/mask pair folder (bands of a cut image get their own file names)."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    names = []
    for u in units:
        name = u.name.replace(".png#", "_band") + ("" if u.name.endswith(".png") else ".png")
        Image.fromarray(u.rgb).save(root / "img" / name)
        Image.fromarray(u.mask.astype(np.uint8)).save(root / "mask" / name)
        names.append(name)
    return names


def _slide_fold(run: dict[str, Any], plan_name: str, keep: Path | None = None) -> dict[str, Any]:
    """The fold's held-out units as one mosaic slide through ``fprotoseg segment`` (``keep``: a
    folder that keeps the mosaic, its ground truth and the results)."""
    sys.path.insert(0, str(REPO / "bench"))
    from mosaic_eval import slide_scores

    from fprotoseg.model.training.cv import load_units, read_plan

    plan = read_plan(plan_name, SHARED_DATA)
    units = [u for u in load_units(plan) if u.fold == run["fold"] and u.mask is not None]
    if not units:  # a slide with image-level labels only: nothing to score pixels against
        return {}
    with tempfile.TemporaryDirectory(prefix="fprotoseg-cv-") as tmp:
        root = Path(tmp) / "data"
        names = _write_fold_data(units, root)
        work = keep or Path(tmp) / "work"
        work.mkdir(parents=True, exist_ok=True)
        scores = slide_scores(Path(run["checkpoint"]), root, names, work, plan.dataset, plan.mpp)
    return {
        "slide_miou_present": scores["miou_present"],
        "slide_iou": scores["iou"],
        "slide_present": scores["present"],
    }


def figure(run: dict[str, Any], plan_name: str, out_png: Path, more: tuple[dict[str, Any], ...] = ()) -> None:
    """A fold's mosaic slide: the slide, the ground truth and the prediction side by side, then the
    prediction of each run in ``more`` (the same fold under other inference options)."""
    import tifffile
    from PIL import Image

    from fprotoseg.model.training.cv import read_plan
    from fprotoseg.model.training.datasets import DATASETS

    colours = DATASETS[read_plan(plan_name, SHARED_DATA).dataset].colors
    preds = []
    for i, r in enumerate((run, *more)):
        with tempfile.TemporaryDirectory(prefix="fprotoseg-cv-figure-") as tmp:
            work = Path(tmp)
            _slide_fold(r, plan_name, keep=work)
            if i == 0:
                with tifffile.TiffFile(work / "mosaic.tiff") as tif:
                    rgb = tif.pages[0].asarray()[..., :3]
                gt = np.asarray(Image.open(work / "mosaic.gt.png"))
            with tifffile.TiffFile(work / "out" / "mask.tiff") as tif:
                preds.append(tif.pages[0].asarray())
    save_panels(out_png, rgb, gt, preds, colours, width_px=1800 if not more else 2400)


def save_panels(
    out_png: Path,
    rgb: np.ndarray,
    gt: np.ndarray,
    preds: list[np.ndarray],
    colours: tuple[tuple[int, int, int], ...] | list[Any],
    width_px: int = 2400,
) -> None:
    """One PNG: the slide, its ground truth (class k; 255 unlabelled, white) and each label map
    (0 glass, k + 1 class k; at any resolution, drawn at the slide's), side by side."""
    from PIL import Image

    palette = np.full((256, 3), 255, np.uint8)
    for k, colour in enumerate(colours):
        palette[k] = colour  # ground truth: class k
    gt_rgb = palette[gt]
    pred_palette = np.full((256, 3), 255, np.uint8)
    pred_palette[1 : len(colours) + 1] = palette[: len(colours)]
    gap = np.full((rgb.shape[0], 16, 3), 255, np.uint8)
    parts = [rgb, gap, gt_rgb]
    for pred in preds:
        parts += [gap, np.asarray(Image.fromarray(pred_palette[pred]).resize(gt.shape[::-1], Image.NEAREST))]
    panel = np.concatenate(parts, axis=1)
    scale = min(1.0, width_px / panel.shape[1])
    img = Image.fromarray(panel)
    img = img.resize((round(panel.shape[1] * scale), round(panel.shape[0] * scale)), Image.LANCZOS)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    img.save(out_png, optimize=True)


def _fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f} ± {sd:.3f}"


def table(runs: list[dict[str, Any]], classes: tuple[str, ...]) -> str:
    """One row per recipe: per-fold mIoU mean ± sd (over folds and seeds, folds with masks), pooled
    mIoU, per class, the whole-slide mean ± sd where it was measured, and the image-level F1 of the
    folds without masks (mean over their present classes)."""
    from fprotoseg.model.training.cv import CvResult, presence_f1

    lines = [
        "| recipe | runs | crop mIoU, folds (mean ± sd) | crop mIoU, pooled | "
        + " | ".join(classes)
        + " | whole slide, folds (mean ± sd) | image-level F1, folds without masks |",
        "|---|---|---|---|" + "---|" * len(classes) + "---|---|",
    ]
    for name in dict.fromkeys(r["recipe"] for r in runs):
        mine = [r for r in runs if r["recipe"] == name]
        masked = [r for r in mine if np.asarray(r["confusion"]).sum() > 0]
        label_only = [np.asarray(r["presence"]) for r in mine if np.asarray(r.get("presence", 0)).sum() > 0]
        f1 = f"{float(np.nanmean(presence_f1(sum(label_only)))):.3f}" if label_only else "—"
        if not masked:
            lines.append(
                f"| {name} | {len(mine)} | — | — | " + " | ".join("—" for _ in classes) + f" | — | {f1} |"
            )
            continue
        res = CvResult(classes, {(r["seed"], r["fold"]): np.array(r["confusion"]) for r in masked})
        s = res.summary()
        slides = [r["slide_miou_present"] for r in mine if "slide_miou_present" in r]
        slide = _fmt(float(np.mean(slides)), float(np.std(slides))) + f" ({len(slides)})" if slides else "—"
        lines.append(
            f"| {name} | {s['runs']} | {_fmt(s['folds_miou_mean'], s['folds_miou_sd'])} | "
            f"{_fmt(s['pooled_miou_mean'], s['pooled_miou_sd'])} | "
            + " | ".join(f"{s['iou'][c]:.3f}" for c in classes)
            + f" | {slide} | {f1} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="+", help="recipe YAML files (model/recipes/cam_cnn_*.yaml)")
    ap.add_argument("--plan", default="cv_wsss4luad", help="fold plan (model/recipes/cv_*.yaml)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds")
    ap.add_argument("--folds", default=None, help="comma-separated folds (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (one torch thread each when > 1)")
    ap.add_argument("--slide", action="store_true", help="also score each fold as a whole slide")
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "cv")
    ap.add_argument("--figure", type=Path, default=None, help="PNG: the first recipe's first fold as a slide")
    args = ap.parse_args(argv)

    from fprotoseg.model.training.cam_cnn import CamCnnRecipe
    from fprotoseg.model.training.cv import read_plan

    plan = read_plan(args.plan, SHARED_DATA)
    folds = [int(f) for f in args.folds.split(",")] if args.folds else list(range(plan.num_folds))
    seeds = [int(s) for s in args.seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / f"{args.plan}.jsonl"
    done: dict[tuple[str, int, int], dict[str, Any]] = {}
    if results_path.exists():
        for line in results_path.read_text().splitlines():
            r = json.loads(line)
            done[(r["recipe"], r["seed"], r["fold"])] = r
    todo = []
    for path in args.recipes:
        recipe = CamCnnRecipe.from_yaml(path)
        todo += [(path, recipe.name, s, f) for s in seeds for f in folds if (recipe.name, s, f) not in done]
    threads = 1 if args.jobs > 1 else (os.cpu_count() or 1)
    print(f"{len(todo)} runs to train ({len(done)} kept from {results_path})", flush=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(_run_fold, p, args.plan, s, f, str(args.out), threads) for p, _, s, f in todo]
        for fut in futures:
            r = fut.result()
            done[(r["recipe"], r["seed"], r["fold"])] = r
            with results_path.open("a") as fh:
                fh.write(json.dumps(r) + "\n")
            print(
                f"  {r['recipe']} seed {r['seed']} fold {r['fold']}: trained in {r['train_s']} s", flush=True
            )
    names = {CamCnnRecipe.from_yaml(p).name for p in args.recipes}
    runs = [r for k, r in done.items() if k[0] in names and k[1] in seeds and k[2] in folds]
    if args.slide:
        for r in runs:
            if "slide_miou_present" not in r:
                r.update(_slide_fold(r, args.plan))
                if "slide_miou_present" not in r:
                    continue
                print(
                    f"  {r['recipe']} seed {r['seed']} fold {r['fold']}: slide {r['slide_miou_present']:.3f}",
                    flush=True,
                )
        results_path.write_text("".join(json.dumps(r) + "\n" for r in done.values()))
    from fprotoseg.model.training.datasets import DATASETS

    print(table(runs, DATASETS[plan.dataset].qupath_names))
    if args.figure is not None:
        first = CamCnnRecipe.from_yaml(args.recipes[0]).name
        figure(done[(first, seeds[0], folds[0])], args.plan, args.figure)
        print(f"figure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
