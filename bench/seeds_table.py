"""Mean ± sd over seeds of finished training runs: the rows of the model card's tables.

Why: one seed of a weakly supervised run on ~50 images swings by several mIoU points, so every
figure the README reports is a mean over seeds, on the fixed validation split of the run's config,
with the crop figure (mirrored context, on glass, and restained with fixed H&E stain shifts as a
proxy for another lab's slides), the stage-1 pseudo-mask mIoU where the run
logged it, and optionally the whole-slide figure of a mosaic of the same crops beside it.

    python bench/seeds_table.py "plain CAM=runs/a_s0,runs/a_s1,runs/a_s2" "+ text=runs/b_s0,..." --slide
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mosaic_eval import DEFAULT_ROOT, slide_scores


def run_checkpoint(run: Path) -> Path:
    for name in ("final.safetensors", "best.safetensors"):
        if (run / name).is_file():
            return run / name
    raise SystemExit(f"{run}: no final.safetensors or best.safetensors")


def with_gate_pool(ckpt: Path, pool: int, tmp: Path) -> Path:
    """A copy of the checkpoint whose class gate pools over ``pool`` feature cells, so runs
    logged with different inference settings are compared under one."""
    from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint

    state, manifest = read_checkpoint(ckpt)
    cfg = json.loads(json.dumps(manifest["config"]))
    if manifest["architecture"] == "fprotoseg_seg_gated":
        cfg["stage2"]["gate_pool"] = pool
    else:
        cfg.setdefault("inference", {})["image_logit_pool"] = pool
    return save_checkpoint(tmp / ckpt.name, state, {**manifest, "config": cfg})


def score_run(run: Path, slide: bool, gate_pool: int | None, tmp: Path) -> dict[str, float]:
    from fprotoseg.model.training.evaluate import evaluate_checkpoint, heldout_names

    ckpt = run_checkpoint(run)
    if gate_pool is not None:
        ckpt = with_gate_pool(ckpt, gate_pool, tmp)
    names = heldout_names(ckpt)
    out: dict[str, float] = {}
    for context in ("reflect", "glass"):
        r = evaluate_checkpoint(ckpt, DEFAULT_ROOT, "wsss4luad", names, context=context)
        out[f"{context}_miou"] = r["miou"]
        if context == "reflect":
            out.update({f"iou_{k}": v for k, v in r["iou"].items()})
    out["restained_miou"] = restained_miou(ckpt, names)
    pseudo = pseudo_miou(ckpt, names)
    if pseudo is not None:
        out["pseudo_miou"] = pseudo
    if slide:
        with tempfile.TemporaryDirectory(prefix="fprotoseg-seeds-") as tmp:
            out["slide_miou"] = slide_scores(ckpt, DEFAULT_ROOT, names, Path(tmp))["miou"]
    return out


def restained_miou(ckpt: Path, names: list[str]) -> float:
    """Crop mIoU averaged over the fixed stain shifts (a proxy for another lab's slides)."""
    from fprotoseg.model import load_segmenter
    from fprotoseg.model.stain_norm import normalise_image
    from fprotoseg.model.training.datasets import MaskedImage, load_pairs
    from fprotoseg.model.training.evaluate import predict_labels, score_pairs
    from fprotoseg.model.training.stain import STAIN_SHIFTS, shift_stain

    seg = load_segmenter(ckpt, device="cpu")
    pairs = load_pairs(DEFAULT_ROOT, names)
    mious = []
    for shift in STAIN_SHIFTS:
        shifted = [MaskedImage(p.name, shift_stain(p.rgb, shift), p.mask) for p in pairs]
        r = score_pairs(shifted, lambda p: predict_labels(
            seg.predict, normalise_image(seg.manifest, p.rgb), seg.tile_size_px
        ), "wsss4luad")
        mious.append(r["miou"])
    return float(sum(mious) / len(mious))


def pseudo_miou(ckpt: Path, names: list[str]) -> float | None:
    """Stage-1 pseudo-mask mIoU on the split (CAMs gated by each image's true label)."""
    from fprotoseg.model.checkpoint import read_checkpoint
    from fprotoseg.model.config_schema import as_train_config
    from fprotoseg.model.segmenter import build_inference_module
    from fprotoseg.model.training.datasets import load_pairs
    from fprotoseg.model.training.train import pseudo_mask_scores

    state, manifest = read_checkpoint(ckpt)
    if manifest["architecture"] != "fprotoseg_cam":
        return None
    module = build_inference_module(manifest, state).eval()
    cfg = as_train_config(manifest["config"])
    fusion, min_frac = cfg.inference.fusion, cfg.data.min_fraction
    pairs = load_pairs(DEFAULT_ROOT, names)
    norm = manifest["normalisation"]
    return pseudo_mask_scores(module.net, pairs, "wsss4luad", "cpu", norm, fusion, min_frac)["miou"]


def mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("rows", nargs="+", help='"row name=run_dir,run_dir,..."')
    ap.add_argument("--slide", action="store_true", help="also the mosaic whole-slide mIoU (slower)")
    ap.add_argument("--gate-pool", type=int, default=None, help="score every run with this class gate")
    ap.add_argument("--json", type=Path, default=None, help="write every run's figures here too")
    args = ap.parse_args(argv)
    cols = ["reflect_miou", "glass_miou", "restained_miou", "slide_miou", "pseudo_miou"]
    cols += ["iou_tumor", "iou_stroma", "iou_normal"]
    print(
        "| row | seeds | crop mIoU | crop on glass | crop restained | whole slide | pseudo-mask "
        "| Tumor | Stroma | Normal |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    everything: dict[str, list[dict[str, float]]] = {}
    for row in args.rows:
        name, dirs = row.split("=", 1)
        runs = [Path(d) for d in dirs.split(",") if d]
        with tempfile.TemporaryDirectory(prefix="fprotoseg-gate-") as tmp:
            scores = [score_run(r, args.slide, args.gate_pool, Path(tmp)) for r in runs]
        everything[name] = scores
        cells = [mean_sd([s[c] for s in scores if c in s]) for c in cols]
        print(f"| {name} | {len(runs)} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
