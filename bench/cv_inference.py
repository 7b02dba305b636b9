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
from pathlib import Path
from typing import Any

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
                (u.mask, predict_scores(
                    seg.predict, normalise_image(seg.manifest, u.rgb), seg.tile_size_px
                ).astype(np.float16))
                for u in units
            ]
    seg.module = net
    return out


def _confusion(pairs: list[tuple[np.ndarray, np.ndarray]], log_prior: np.ndarray, dataset: str) -> np.ndarray:
    from fprotoseg.model.training.cv import unit_confusion

    k = len(log_prior)
    cm = np.zeros((k, k), np.int64)
    w = np.exp(log_prior).astype(np.float32).reshape(-1, 1, 1)
    for mask, scores in pairs:
        cm += unit_confusion(mask, (scores.astype(np.float32) * w).argmax(0), dataset)
    return cm


def _slide(run: dict[str, Any], plan_name: str, inference: dict[str, Any], work: Path) -> float:
    """The fold's whole-slide mIoU with ``inference`` written into a copy of its checkpoint."""
    sys.path.insert(0, str(REPO / "bench"))
    from cv import _slide_fold

    from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint

    state, manifest = read_checkpoint(Path(run["checkpoint"]))
    manifest = copy.deepcopy(manifest)
    manifest["inference"] = inference
    ckpt = work / (Path(run["checkpoint"]).stem + "_inference.safetensors")
    save_checkpoint(ckpt, state, manifest)
    return float(_slide_fold({**run, "checkpoint": str(ckpt)}, plan_name)["slide_miou_present"])


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
    views = [int(v) for v in args.views.split(",")]
    scores = {(r["seed"], r["fold"]): _fold_scores(r, args.plan, views) for r in runs}
    flat = np.zeros(k)
    grid = [np.array((0.0, *p)) for p in itertools.product(PRIOR_STEPS, repeat=k - 1)]
    table: dict[str, Any] = {"recipe": recipe.name, "runs": len(runs), "views": {}}
    for v in views:
        plain = {key: _confusion(s[v], flat, plan.dataset) for key, s in scores.items()}
        per_grid = {key: [_confusion(s[v], g, plan.dataset) for g in grid] for key, s in scores.items()}
        nested, chosen = {}, {}
        for key in scores:
            others = [o for o in scores if o != key and o[0] == key[0]]
            if not others:  # one fold alone: nothing to choose a prior on
                raise SystemExit("the nested prior needs at least two folds of a seed")
            best = int(
                np.argmax([miou_present(sum(per_grid[o][i] for o in others)) for i in range(len(grid))])
            )
            chosen[key] = grid[best].tolist()
            nested[key] = per_grid[key][best]
        best_all = int(
            np.argmax([miou_present(sum(per_grid[o][i] for o in scores)) for i in range(len(grid))])
        )
        row = {
            "folds": {f"s{s}f{f}": round(miou_present(cm), 4) for (s, f), cm in plain.items()},
            "mean": float(np.mean([miou_present(cm) for cm in plain.values()])),
            "sd": float(np.std([miou_present(cm) for cm in plain.values()])),
            "pooled": miou_present(sum(plain.values())),
            "nested_prior_folds": {f"s{s}f{f}": round(miou_present(cm), 4) for (s, f), cm in nested.items()},
            "nested_prior_mean": float(np.mean([miou_present(cm) for cm in nested.values()])),
            "nested_prior_sd": float(np.std([miou_present(cm) for cm in nested.values()])),
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
