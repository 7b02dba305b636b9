"""Choose inference-time options by cross-validation, on the fold networks ``bench/cv.py`` trained.

Why: averaging a tile's scores over its rotations and mirrors, or moving the decision between two
classes the network confuses, changes no weight; it still has to earn its place on tissue the
network never saw. Each fold's network (saved by ``bench/cv.py``) scores its own held-out units
under every option. The view count is compared fold by fold. The class log-prior is chosen
*nested*: for fold k it is the grid point with the best pooled mIoU over the other folds'
out-of-fold scores, then applied to fold k, so no fold's figure comes from a prior chosen on it.
The prior printed last (chosen on all folds) is what a shipped file would carry.

    python bench/cv_inference.py model/recipes/cam_cnn_glass.yaml --views 1,2,4,8 \
        --slide-views 4 --slide-prior
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PRIOR_STEPS = (-1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5)


def _fold_scores(
    run: dict[str, Any], plan_name: str, views: list[int]
) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """For each view count: (mask, float16 (K, H, W) scores) of every held-out masked unit."""
    import torch

    from fprotoseg.model import load_segmenter
    from fprotoseg.model.inference_options import DihedralMean
    from fprotoseg.model.stain_norm import normalise_image
    from fprotoseg.model.training.cv import load_units, read_plan
    from fprotoseg.model.training.evaluate import predict_scores

    plan = read_plan(plan_name, SHARED_DATA)
    units = [u for u in load_units(plan) if u.fold == run["fold"] and u.mask is not None]
    seg = load_segmenter(run["checkpoint"], device="cpu")
    net = seg.module
    out: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for v in views:
        seg.module = net if v == 1 else DihedralMean(net, v).eval()
        with torch.inference_mode():
            out[v] = [
                (
                    u.mask,
                    predict_scores(
                        seg.predict, normalise_image(seg.manifest, u.rgb), seg.tile_size_px
                    ).astype(np.float16),
                )
                for u in units
            ]
    seg.module = net
    return out


# Guided refinement grid: (output_stride, radius_cells, eps); None = the network's cells alone.
REFINE_GRID: tuple[tuple[int, int, float] | None, ...] = (
    None,
    *((s, r, e) for s, r in ((4, 8), (8, 4), (8, 8), (4, 16)) for e in (0.001, 0.01)),
)


class _Memo:
    """The network's scores per input batch, computed once: every refinement of the grid refines
    the same cached scores (the network is the cost, the filter is cheap)."""

    def __init__(self, net: Any) -> None:
        self.net, self.cache = net, {}  # one memo per unit: a few batches at most

    def __call__(self, x: Any) -> Any:
        import hashlib

        key = (tuple(x.shape), hashlib.sha1(x.numpy().tobytes()).hexdigest())
        if key not in self.cache:
            self.cache[key] = self.net(x)
        return self.cache[key]


def _refine_confusions(
    run: dict[str, Any], plan_name: str, views: int, tile_px: int | None
) -> dict[str, np.ndarray]:
    """The fold's out-of-fold confusion under every point of :data:`REFINE_GRID` (``views`` views);
    refined points run on ``tile_px`` tiles (None: the checkpoint's), the network alone on its own."""
    import torch

    from fprotoseg.model import load_segmenter
    from fprotoseg.model.inference_options import DihedralMean, GuidedRefine
    from fprotoseg.model.stain_norm import normalise_image
    from fprotoseg.model.training.cv import load_units, read_plan, unit_confusion
    from fprotoseg.model.training.evaluate import predict_scores

    plan = read_plan(plan_name, SHARED_DATA)
    units = [u for u in load_units(plan) if u.fold == run["fold"] and u.mask is not None]
    seg = load_segmenter(run["checkpoint"], device="cpu")
    net = seg.module if views == 1 else DihedralMean(seg.module, views).eval()
    norm = seg.manifest.get("normalisation", {"mean": [0.5] * 3, "std": [0.5] * 3})
    k = len(seg.classes)
    out = {_grid_key(g): np.zeros((k, k), np.int64) for g in REFINE_GRID}
    with torch.inference_mode():
        for u in units:
            memo = _Memo(net)
            rgb = normalise_image(seg.manifest, u.rgb)
            for g in REFINE_GRID:
                size_px = seg.tile_size_px if g is None or tile_px is None else tile_px
                if g is None:
                    seg.module = memo
                else:
                    stride, radius, eps = g
                    refine = GuidedRefine(
                        torch.nn.Identity(), seg.output_stride, stride, radius, eps, norm["mean"], norm["std"]
                    )
                    seg.module = lambda x, refine=refine, memo=memo: refine.refine(x, memo(x))
                labels = predict_scores(seg.predict, rgb, size_px).argmax(0)
                out[_grid_key(g)] += unit_confusion(u.mask, labels, plan.dataset)
    return out


def _grid_key(g: tuple[int, int, float] | None) -> str:
    return "none" if g is None else f"s{g[0]}r{g[1]}e{g[2]:g}"


def _grid_inference(g: tuple[int, int, float] | None) -> dict[str, Any]:
    if g is None:
        return {}
    return {"guided_refine": {"output_stride": g[0], "radius_cells": g[1], "eps": g[2]}}


Fold = tuple[int, int]  # (seed, fold)
P = TypeVar("P")


def _nested_choice(
    folds: Iterable[Fold], points: Sequence[P], score: Callable[[list[Fold], P], float]
) -> tuple[dict[Fold, P], dict[Fold, float]]:
    """For each fold k: the point with the best ``score`` over the other folds of k's seed, and
    that point's score on fold k alone. Why one helper: every option this script chooses (the class
    prior, the refinement on crops, the refinement on slides) must be chosen the same nested way,
    so that no fold's figure comes from a choice made on it. Ties go to the earlier point."""
    folds = list(folds)
    chosen: dict[Fold, P] = {}
    nested: dict[Fold, float] = {}
    for key in folds:
        others = [o for o in folds if o != key and o[0] == key[0]]
        if not others:
            raise SystemExit("a nested choice needs at least two folds of a seed")
        best = max(points, key=lambda p: score(others, p))
        chosen[key], nested[key] = best, score([key], best)
    return chosen, nested


class _SlideScores:
    """Whole-slide mIoU of a fold network at a refinement grid point, each slide segmented once
    however many tables ask for it (the slide table and the slide grid share "none" and the
    crop-chosen point; a slide costs 15-25 s on 2 cores)."""

    def __init__(self, plan_name: str, views: int, tile_px: int | None) -> None:
        self.plan_name, self.views, self.tile_px = plan_name, views, tile_px
        self.cache: dict[tuple[int, int, str], float] = {}

    def __call__(self, run: dict[str, Any], g: tuple[int, int, float] | None) -> float:
        import tempfile

        key = (run["seed"], run["fold"], _grid_key(g))
        if key not in self.cache:
            print(f"segmenting slide s{key[0]}f{key[1]} {key[2]}", flush=True)
            base = {"dihedral_views": self.views} if self.views != 1 else {}
            with tempfile.TemporaryDirectory(prefix="fprotoseg-cvslide-") as tmp:
                self.cache[key] = _slide(
                    run,
                    self.plan_name,
                    {**base, **_grid_inference(g)},
                    Path(tmp),
                    None if g is None else self.tile_px,
                )
        return self.cache[key]


def _refine_table(
    runs: list[dict[str, Any]], plan_name: str, views: int, tile_px: int | None, slides: _SlideScores | None
) -> dict[str, Any]:
    """Every grid point's fold mean, and the refinement chosen *nested* (for fold k: the grid point
    with the best pooled mIoU over the other folds of its seed), on crops and, with ``slides``, as
    whole slides beside the same networks without refinement."""
    from fprotoseg.model.training.cv import miou_present

    cms = {}
    for r in runs:
        cms[(r["seed"], r["fold"])] = _refine_confusions(r, plan_name, views, tile_px)
        print(
            f"refine s{r['seed']}f{r['fold']}: "
            + ", ".join(f"{g} {miou_present(cm):.3f}" for g, cm in cms[(r["seed"], r["fold"])].items()),
            flush=True,
        )
    keys = [_grid_key(g) for g in REFINE_GRID]
    grid = {
        g: {
            "mean": float(np.mean([miou_present(c[g]) for c in cms.values()])),
            "sd": float(np.std([miou_present(c[g]) for c in cms.values()])),
            "pooled": miou_present(sum(c[g] for c in cms.values())),
        }
        for g in keys
    }
    chosen, nested = _nested_choice(cms, keys, lambda fs, g: miou_present(sum(cms[f][g] for f in fs)))
    table: dict[str, Any] = {
        "views": views,
        "refine_tile_size_px": tile_px,
        "grid": grid,
        "nested_chosen": {f"s{s}f{f}": g for (s, f), g in chosen.items()},
        "nested_folds": {f"s{s}f{f}": round(v, 4) for (s, f), v in nested.items()},
        "nested_mean": float(np.mean(list(nested.values()))),
        "nested_sd": float(np.std(list(nested.values()))),
        "chosen_on_all_folds": max(keys, key=lambda g: grid[g]["pooled"]),
        "grid_points": {_grid_key(g): _grid_inference(g).get("guided_refine") for g in REFINE_GRID},
    }
    for g in keys:
        print(
            f"refine {g}: folds {grid[g]['mean']:.3f} ± {grid[g]['sd']:.3f} (pooled {grid[g]['pooled']:.3f})"
        )
    print(
        f"refine nested: {table['nested_mean']:.3f} ± {table['nested_sd']:.3f} "
        f"{table['nested_chosen']}; on all folds: {table['chosen_on_all_folds']}",
        flush=True,
    )
    if slides is not None:
        by_key = dict(zip(keys, REFINE_GRID, strict=True))
        rows: dict[str, dict[str, float]] = {"none": {}, "nested": {}}
        for r in runs:
            name = f"s{r['seed']}f{r['fold']}"
            pick = by_key[chosen[(r["seed"], r["fold"])]]
            rows["none"][name], rows["nested"][name] = slides(r, None), slides(r, pick)
            print(
                f"slide {name}: none {rows['none'][name]:.3f}, "
                f"nested {_grid_key(pick)} {rows['nested'][name]:.3f}",
                flush=True,
            )
        table["slide"] = {
            k: {"folds": v, "mean": float(np.mean(list(v.values()))), "sd": float(np.std(list(v.values())))}
            for k, v in rows.items()
        }
        print(
            "whole slide: "
            + ", ".join(f"{k} {v['mean']:.3f} ± {v['sd']:.3f}" for k, v in table["slide"].items())
        )
    return table


def _slide_grid_table(runs: list[dict[str, Any]], slides: _SlideScores) -> dict[str, Any]:
    """Every grid point scored as whole slides, and the refinement chosen *nested on slides*: for
    fold k, the point with the best mean slide mIoU over the other folds of its seed, scored on
    fold k's slide. Why beside the crop choice: the service segments slides, and a choice made on
    crops raised 4 of 5 crop folds but only 2 of 5 slides."""
    keys = [_grid_key(g) for g in REFINE_GRID]
    scores: dict[Fold, dict[str, float]] = {}
    for r in runs:
        row = {_grid_key(g): slides(r, g) for g in REFINE_GRID}
        scores[(r["seed"], r["fold"])] = row
        print(
            f"slide grid s{r['seed']}f{r['fold']}: " + ", ".join(f"{g} {v:.3f}" for g, v in row.items()),
            flush=True,
        )
    chosen, nested = _nested_choice(scores, keys, lambda fs, g: float(np.mean([scores[f][g] for f in fs])))
    table = {
        "grid": {
            g: {
                "folds": {f"s{s}f{f}": round(v[g], 4) for (s, f), v in scores.items()},
                "mean": float(np.mean([v[g] for v in scores.values()])),
                "sd": float(np.std([v[g] for v in scores.values()])),
            }
            for g in keys
        },
        "nested_chosen": {f"s{s}f{f}": g for (s, f), g in chosen.items()},
        "nested_folds": {f"s{s}f{f}": round(v, 4) for (s, f), v in nested.items()},
        "nested_mean": float(np.mean(list(nested.values()))),
        "nested_sd": float(np.std(list(nested.values()))),
        "chosen_on_all_folds": max(keys, key=lambda g: float(np.mean([v[g] for v in scores.values()]))),
    }
    for g in keys:
        print(f"slide grid {g}: {table['grid'][g]['mean']:.3f} ± {table['grid'][g]['sd']:.3f}")
    print(
        f"slide grid nested: {table['nested_mean']:.3f} ± {table['nested_sd']:.3f} {table['nested_chosen']}; "
        f"on all folds: {table['chosen_on_all_folds']}",
        flush=True,
    )
    return table


def _confusion(pairs: list[tuple[np.ndarray, np.ndarray]], log_prior: np.ndarray, dataset: str) -> np.ndarray:
    from fprotoseg.model.training.cv import unit_confusion

    k = len(log_prior)
    cm = np.zeros((k, k), np.int64)
    w = np.exp(log_prior).astype(np.float32).reshape(-1, 1, 1)
    for mask, scores in pairs:
        cm += unit_confusion(mask, (scores.astype(np.float32) * w).argmax(0), dataset)
    return cm


def _with_inference(
    run: dict[str, Any], inference: dict[str, Any], work: Path, tile_px: int | None = None
) -> dict[str, Any]:
    """The fold's run with ``inference`` (and ``tile_px`` tiles, where given) written into a copy of
    its checkpoint in ``work``."""
    from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint

    state, manifest = read_checkpoint(Path(run["checkpoint"]))
    manifest = copy.deepcopy(manifest)
    manifest["inference"] = inference
    if tile_px is not None:
        manifest["tile_size_px"] = tile_px
    ckpt = work / f"{Path(run['checkpoint']).stem}_{uuid.uuid4().hex[:8]}.safetensors"
    save_checkpoint(ckpt, state, manifest)
    return {**run, "checkpoint": str(ckpt)}


def _slide(
    run: dict[str, Any], plan_name: str, inference: dict[str, Any], work: Path, tile_px: int | None = None
) -> float:
    """The fold's whole-slide mIoU with ``inference`` (and ``tile_px`` tiles, where given)."""
    sys.path.insert(0, str(REPO / "bench"))
    from cv import _slide_fold

    return float(_slide_fold(_with_inference(run, inference, work, tile_px), plan_name)["slide_miou_present"])


def _refine_figure(
    runs: list[dict[str, Any]], plan_name: str, table: dict[str, Any], fold: int, out_png: Path
) -> None:
    """One fold as a mosaic slide: slide, ground truth, the fold network without refinement, and
    with the refinement chosen on all folds."""
    import tempfile

    sys.path.insert(0, str(REPO / "bench"))
    from cv import figure

    run = next((r for r in runs if r["fold"] == fold), None)
    if run is None:
        raise SystemExit(f"--figure-fold {fold}: no run of that fold")
    base = {"dihedral_views": table["views"]} if table["views"] != 1 else {}
    refine = table["grid_points"][table["chosen_on_all_folds"]]
    with tempfile.TemporaryDirectory(prefix="fprotoseg-cvref-fig-") as tmp:
        plain = _with_inference(run, base, Path(tmp))
        refined = {**base, "guided_refine": refine} if refine else base
        figure(
            plain,
            plan_name,
            out_png,
            (_with_inference(run, refined, Path(tmp), table["refine_tile_size_px"]),),
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipe", type=Path, help="the recipe whose fold networks are scored")
    ap.add_argument("--plan", default="cv_wsss4luad")
    ap.add_argument("--cv", type=Path, default=REPO / "runs" / "cv" / "cv_wsss4luad.jsonl")
    ap.add_argument("--views", default="1,4,8", help="dihedral view counts to compare (1 = none)")
    ap.add_argument("--slide-views", type=int, default=None, help="score this view count as whole slides")
    ap.add_argument(
        "--slide-prior", action="store_true", help="with --slide-views: add each fold's nested prior"
    )
    ap.add_argument(
        "--refine",
        type=int,
        default=None,
        metavar="VIEWS",
        help="score the guided-refinement grid on top of this view count (nested choice per fold)",
    )
    ap.add_argument("--slide-refine", action="store_true", help="with --refine: also as whole slides")
    ap.add_argument(
        "--slide-grid",
        action="store_true",
        help="with --refine: every grid point as whole slides, and the refinement chosen nested on slides",
    )
    ap.add_argument(
        "--refine-tile-px",
        type=int,
        default=None,
        help="with --refine: tile size of the refined runs (a larger tile pays for the larger margin)",
    )
    ap.add_argument(
        "--figure",
        type=Path,
        default=None,
        help="with --refine: PNG of one fold as a slide, without and with",
    )
    ap.add_argument("--figure-fold", type=int, default=2, help="the fold --figure draws")
    ap.add_argument(
        "--stage1",
        action="store_true",
        help="score each run's stage-1 network (kept by a recipe with stage 2): the run without stage 2",
    )
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "cv" / "cv_inference.json")
    args = ap.parse_args(argv)

    from fprotoseg.model.training.cam_cnn import CamCnnRecipe
    from fprotoseg.model.training.cv import miou_present, read_plan
    from fprotoseg.model.training.datasets import DATASETS

    recipe = CamCnnRecipe.from_yaml(args.recipe)
    plan = read_plan(args.plan, SHARED_DATA)
    k = len(DATASETS[plan.dataset].classes)
    runs = [json.loads(line) for line in args.cv.read_text().splitlines() if line.strip()]
    runs = [r for r in runs if r["recipe"] == recipe.name and np.asarray(r["confusion"]).sum() > 0]
    if not runs:
        raise SystemExit(f"{args.cv} holds no masked fold of {recipe.name}")
    if args.stage1:
        if not all("stage1_checkpoint" in r for r in runs):
            raise SystemExit(f"--stage1: the runs of {recipe.name} kept no stage-1 network (no stage 2)")
        runs = [{**r, "checkpoint": r["stage1_checkpoint"]} for r in runs]
    if args.refine is not None:
        slide_scores = _SlideScores(args.plan, args.refine, args.refine_tile_px)
        table = {
            "recipe": recipe.name,
            "runs": len(runs),
            "refine": _refine_table(
                runs, args.plan, args.refine, args.refine_tile_px, slide_scores if args.slide_refine else None
            ),
        }
        if args.slide_grid:
            table["slide_grid"] = _slide_grid_table(runs, slide_scores)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(table, indent=1))
        if args.figure is not None:
            _refine_figure(runs, args.plan, table["refine"], args.figure_fold, args.figure)
        return 0
    views = [int(v) for v in args.views.split(",")]
    scores = {(r["seed"], r["fold"]): _fold_scores(r, args.plan, views) for r in runs}
    flat = np.zeros(k)
    grid = [np.array((0.0, *p)) for p in itertools.product(PRIOR_STEPS, repeat=k - 1)]
    table: dict[str, Any] = {"recipe": recipe.name, "runs": len(runs), "views": {}}
    for v in views:
        plain = {key: _confusion(s[v], flat, plan.dataset) for key, s in scores.items()}
        per_grid = {key: [_confusion(s[v], g, plan.dataset) for g in grid] for key, s in scores.items()}
        best_of, nested = _nested_choice(
            scores, range(len(grid)), lambda fs, i, cms=per_grid: miou_present(sum(cms[f][i] for f in fs))
        )
        chosen = {key: grid[i].tolist() for key, i in best_of.items()}
        best_all = int(
            np.argmax([miou_present(sum(per_grid[o][i] for o in scores)) for i in range(len(grid))])
        )
        row = {
            "folds": {f"s{s}f{f}": round(miou_present(cm), 4) for (s, f), cm in plain.items()},
            "mean": float(np.mean([miou_present(cm) for cm in plain.values()])),
            "sd": float(np.std([miou_present(cm) for cm in plain.values()])),
            "pooled": miou_present(sum(plain.values())),
            "nested_prior_folds": {f"s{s}f{f}": round(v, 4) for (s, f), v in nested.items()},
            "nested_prior_mean": float(np.mean(list(nested.values()))),
            "nested_prior_sd": float(np.std(list(nested.values()))),
            "nested_prior_chosen": {f"s{s}f{f}": c for (s, f), c in chosen.items()},
            "prior_on_all_folds": grid[best_all].tolist(),
        }
        table["views"][str(v)] = row
        print(
            f"views {v}: folds {row['mean']:.3f} ± {row['sd']:.3f} (pooled {row['pooled']:.3f}); "
            f"+ nested prior {row['nested_prior_mean']:.3f} ± {row['nested_prior_sd']:.3f}; "
            f"prior on all folds {row['prior_on_all_folds']}",
            flush=True,
        )
    if args.slide_views is not None:
        import tempfile

        v = args.slide_views
        row = table["views"][str(v)]
        with tempfile.TemporaryDirectory(prefix="fprotoseg-cvinf-") as tmp:
            slides = {}
            for r in runs:
                key = f"s{r['seed']}f{r['fold']}"
                inference: dict[str, Any] = {"dihedral_views": v}
                if args.slide_prior:  # the fold's nested prior, chosen on the other folds
                    inference["class_log_prior"] = row["nested_prior_chosen"][key]
                slides[key] = _slide(r, args.plan, inference, Path(tmp))
                print(f"slide {key} {inference}: {slides[key]:.3f}", flush=True)
        table["slide"] = {
            "views": v,
            "nested_prior": args.slide_prior,
            "folds": slides,
            "mean": float(np.mean(list(slides.values()))),
            "sd": float(np.std(list(slides.values()))),
        }
        print(
            f"whole slide, views {v}, prior {args.slide_prior}: "
            f"{table['slide']['mean']:.3f} ± {table['slide']['sd']:.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
