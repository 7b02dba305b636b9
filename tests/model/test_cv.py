"""Cross-validation: fixed folds on the real crops, the CV command and the shipped file's manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fprotoseg.model.training.cam_cnn import CamCnnRecipe, train
from fprotoseg.model.training.cv import (
    CvResult,
    assign_folds,
    iou_from_confusion,
    load_units,
    miou_present,
    predicted_presence,
    presence_counts,
    presence_f1,
    read_plan,
)
from fprotoseg.model.training.datasets import DatasetError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan_units(shared_data: Path):
    plan = read_plan("cv_wsss4luad", shared_data)
    return plan, load_units(plan)


def test_every_crop_is_in_exactly_one_fold_and_normal_in_every_fold(plan_units) -> None:
    plan, units = plan_units
    assert plan.num_folds == 5
    stems = {u.name.split("#")[0] for u in units}
    assert len(stems) == 67 and len(units) == 70
    for fold in range(5):
        masks = [u.mask for u in units if u.fold == fold]
        assert any((m == 2).any() for m in masks), f"fold {fold} has no Normal"
        assert any((m == 0).any() for m in masks) and any((m == 1).any() for m in masks)
    # the bands of 68.png cover it exactly once
    bands = [u for u in units if u.name.startswith("68.png#")]
    assert sum(u.mask.shape[0] for u in bands) == 1710


def test_the_configured_folds_are_the_stratified_assignment(plan_units) -> None:
    """The config is the written-down output of assign_folds: nobody hand-picked a fold."""
    _, units = plan_units
    assigned = assign_folds(units, 5, anchor_class=2, min_fraction=0.02)
    assert assigned == {u.name: u.fold for u in units}


def test_bcss_leaves_one_slide_out(shared_data: Path) -> None:
    """Three folds, one per slide: a fold's units all come from its slide; the two training slides
    give image-level labels only, the third pixel masks; everything is resampled to 0.5 µm/px."""
    plan = read_plan("cv_bcss_wsss", shared_data)
    units = load_units(plan)
    assert plan.num_folds == 3 and plan.mpp == 0.5 and len(units) == 238 + 14
    for fold, (prefix,) in enumerate(plan.folds):
        mine = [u for u in units if u.fold == fold]
        assert mine and all(u.name.startswith(prefix) for u in mine)
    by_fold = [[u for u in units if u.fold == f] for f in range(3)]
    assert [len(f) for f in by_fold] == [140, 98, 14]
    assert all(u.mask is None and u.label is not None and u.label.shape == (4,) for u in by_fold[0])
    assert all(u.mask is not None and u.mask.shape == u.rgb.shape[:2] for u in by_fold[2])
    assert {u.rgb.shape[:2] for u in units} == {(112, 112)}  # 224 px at 0.25 µm/px
    # the masks keep their classes through resampling (nearest): stroma and lymphocytes there
    held_out = np.concatenate([u.mask.ravel() for u in by_fold[2]])
    assert set(np.unique(held_out).tolist()) == {1, 2, 4}  # 4: background
    image = by_fold[0][0].train_image()
    assert image.mask is None and image.label is not None


def test_presence_f1_scores_image_level_labels() -> None:
    labels = np.zeros((10, 10), np.int64)
    labels[:, :6] = 1  # 60% class 0 (1-based map)
    labels[:, 6:9] = 2  # 30% class 1
    labels[:, 9] = 0  # no tissue: not counted
    found = predicted_presence(labels, 3, 0.05)
    assert found.tolist() == [1, 1, 0]
    counts = presence_counts(np.array([1, 0, 1]), found) + presence_counts(np.array([1, 1, 0]), found)
    f1 = presence_f1(counts)
    assert f1[0] == pytest.approx(1.0) and f1[1] == pytest.approx(2 / 3) and f1[2] == pytest.approx(0.0)


def test_label_only_images_keep_their_label_and_masked_crops_relabel_glass() -> None:
    from fprotoseg.model.training.cam_cnn import CropSampler, TrainImage

    rng = np.random.default_rng(0)
    patch = TrainImage(np.full((112, 112, 3), 120, np.uint8), label=np.array([0, 1, 1, 0], np.float32))
    mask = np.zeros((112, 112), np.int64)
    mask[:, 100:] = 1
    masked = TrainImage(np.full((112, 112, 3), 90, np.uint8), mask=mask)
    recipe = CamCnnRecipe(batch=64, glass_prob=1.0)
    crops, labels = CropSampler([patch, masked], recipe, 4).batch(rng)
    from_patch = (crops == 120).all(axis=(1, 2, 3))
    assert from_patch.any() and (~from_patch).any()
    assert (labels[from_patch] == [0, 1, 1, 0]).all()  # no glass on a label-only patch
    # a masked crop's label is the tissue left beside its glass band (none if glass covers it all)
    assert (labels[~from_patch][:, 2:] == 0).all() and (labels[~from_patch][:, 1] == 0).any()
    with pytest.raises(DatasetError):
        TrainImage(np.zeros((4, 4, 3), np.uint8))


def test_scores_over_present_classes() -> None:
    cm = np.array([[8, 2, 0], [2, 8, 0], [0, 0, 0]])  # Normal absent and never predicted
    assert np.isnan(iou_from_confusion(cm)[2])
    assert miou_present(cm) == pytest.approx(8 / 12)
    res = CvResult(("a", "b", "c"), {(0, 0): cm, (0, 1): cm * 2})
    s = res.summary()
    assert s["folds_miou_mean"] == pytest.approx(8 / 12) and s["folds_miou_sd"] == pytest.approx(0)
    assert s["confusion"] == (cm * 3).tolist()


def test_a_recipe_refuses_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nhed_sigmaa: 0.1\n")
    with pytest.raises(DatasetError, match="hed_sigmaa"):
        CamCnnRecipe.from_yaml(path)
    assert CamCnnRecipe().receptive_field_px == 75
    assert CamCnnRecipe().output_stride == 8


def test_training_lowers_the_loss_on_real_crops(plan_units) -> None:
    _, units = plan_units
    losses: list[float] = []
    recipe = CamCnnRecipe(steps=40, batch=8, channels=(8, 16, 32, 32), lr=3e-3)
    train([u.train_image() for u in units[:10]], recipe, 0, progress=lambda _, loss: losses.append(loss))
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


@pytest.mark.slow
def test_cv_command_then_the_shipped_file_records_cv_figures(tmp_path: Path, shared_data: Path) -> None:
    """bench/cv.py trains and scores a fold; model/training/ship.py trains on all units and writes the CV
    figures (never a score on its own training data) into a checkpoint the service loads."""
    recipe = tmp_path / "quick.yaml"
    recipe.write_text("name: quick\nsteps: 3\nbatch: 4\nchannels: [8, 8, 16, 16]\n")
    base = tmp_path / "base.yaml"
    base.write_text("name: base\nsteps: 2\nbatch: 4\nchannels: [8, 8, 16, 16]\n")
    out = tmp_path / "cv"
    cmd = [
        sys.executable,
        str(REPO / "bench" / "cv.py"),
        str(recipe),
        str(base),
        "--folds",
        "0",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| quick | 1 |" in proc.stdout and "| base | 1 |" in proc.stdout
    runs = [json.loads(line) for line in (out / "cv_wsss4luad.jsonl").read_text().splitlines()]
    assert {r["recipe"] for r in runs} == {"quick", "base"}
    assert all(np.array(r["confusion"]).sum() > 0 for r in runs)

    ckpt = tmp_path / "shipped.safetensors"
    ship = [sys.executable, "-m", "fprotoseg.model.training.ship", str(recipe), "--baseline", str(base)]
    ship += ["--cv", str(out / "cv_wsss4luad.jsonl"), "--out", str(ckpt), "--shared-data", str(shared_data)]
    proc = subprocess.run(ship, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]

    from fprotoseg.model import load_segmenter

    seg = load_segmenter(ckpt, device="cpu")
    metrics = seg.manifest["metrics"]
    assert metrics["scored_on_training_data"] is False
    assert metrics["cv_recipe"]["runs"] == 1 and metrics["cv_baseline"]["runs"] == 1
    assert seg.manifest["domain"]["organ"] == ["lung"]
    scores = seg.predict(np.full((2, seg.tile_size_px, seg.tile_size_px, 3), 200, np.uint8))
    assert scores.shape == (2, 3, seg.tile_size_px // 8, seg.tile_size_px // 8)
    assert np.allclose(scores.sum(1), 1, atol=1e-3)


@pytest.fixture(scope="module")
def quick_folds(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> tuple[Path, Path]:
    """A three-step recipe's fold networks for folds 0 and 1 (bench/cv.py): (recipe, results
    folder). Shared by the tests of the commands that read fold networks."""
    work = tmp_path_factory.mktemp("quick_folds")
    recipe = work / "quick.yaml"
    recipe.write_text("name: quick\nsteps: 3\nbatch: 4\nchannels: [8, 8, 16, 16]\n")
    out = work / "cv"
    cmd = [sys.executable, str(REPO / "bench" / "cv.py"), str(recipe), "--folds", "0,1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return recipe, out


def test_refinement_is_chosen_on_the_folds_then_added_to_the_shipped_file(
    tmp_path: Path, quick_folds: tuple[Path, Path]
) -> None:
    """bench/cv_inference.py --refine scores the guided-refinement grid on two fold networks and chooses
    it nested; ship_refine writes what the folds chose (and its nested figures) into a shipped file,
    which then predicts at the refined stride, and refuses a table whose folds chose no refinement."""
    recipe, out = quick_folds
    table_path = tmp_path / "refine.json"
    cmd = [sys.executable, str(REPO / "bench" / "cv_inference.py"), str(recipe)]
    # 1024 px tiles: the widest refinement of the grid needs a 178 px margin on a whole slide
    cmd += ["--cv", str(out / "cv_wsss4luad.jsonl"), "--refine", "1", "--refine-tile-px", "1024"]
    cmd += ["--out", str(table_path), "--figure", str(tmp_path / "fold1.png"), "--figure-fold", "1"]
    proc = subprocess.run(
        [*cmd, "--slide-refine", "--slide-grid"], capture_output=True, text=True, cwd=REPO, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = json.loads(table_path.read_text())["refine"]
    slides = json.loads(table_path.read_text())["slide_grid"]  # the same grid, as whole slides
    for fold in ("s0f0", "s0f1"):  # the slide table reads the grid's slides: each segmented once
        assert round(table["slide"]["none"]["folds"][fold], 4) == slides["grid"]["none"]["folds"][fold]
        crop_pick = slides["grid"][table["nested_chosen"][fold]]["folds"][fold]
        assert round(table["slide"]["nested"]["folds"][fold], 4) == crop_pick
    segmented = [line for line in proc.stdout.splitlines() if line.startswith("segmenting slide ")]
    assert len(segmented) == len(set(segmented)) == 2 * len(slides["grid"])
    assert set(slides["grid"]) == set(table["grid"])
    assert all(set(row["folds"]) == {"s0f0", "s0f1"} for row in slides["grid"].values())
    for fold, other in (("s0f0", "s0f1"), ("s0f1", "s0f0")):  # nested: chosen on the other fold's slide
        pick = slides["nested_chosen"][fold]
        assert slides["grid"][pick]["folds"][other] == max(r["folds"][other] for r in slides["grid"].values())
        assert slides["nested_folds"][fold] == slides["grid"][pick]["folds"][fold]
    from PIL import Image

    with Image.open(tmp_path / "fold1.png") as png:  # slide, truth, without, with: four panels
        assert png.width > 3.5 * png.height
    assert set(table["nested_chosen"]) == {"s0f0", "s0f1"}
    assert set(table["grid"]) == set(table["grid_points"]) and "none" in table["grid"]
    assert all(0 < row["mean"] <= 1 for row in table["grid"].values())
    assert all(choice in table["grid"] for choice in table["nested_chosen"].values())
    assert table["chosen_on_all_folds"] == max(table["grid"], key=lambda g: table["grid"][g]["pooled"])

    from fprotoseg.model import load_segmenter
    from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint

    run = json.loads((out / "cv_wsss4luad.jsonl").read_text().splitlines()[0])
    state, manifest = read_checkpoint(Path(run["checkpoint"]))
    assert "guided_refine" not in (manifest.get("inference") or {})
    shipped = tmp_path / "shipped.safetensors"
    save_checkpoint(shipped, state, manifest)
    ship = [sys.executable, "-m", "fprotoseg.model.training.ship_refine", str(shipped), "--refine-cv"]

    table["chosen_on_all_folds"] = "none"
    (tmp_path / "none.json").write_text(json.dumps({"refine": table}))
    proc = subprocess.run([*ship, str(tmp_path / "none.json")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode != 0 and "chose no refinement" in proc.stderr

    table["chosen_on_all_folds"] = "s4r8e0.01"
    (tmp_path / "s4.json").write_text(json.dumps({"refine": table}))
    proc = subprocess.run([*ship, str(tmp_path / "s4.json")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    seg = load_segmenter(shipped, device="cpu")
    assert seg.manifest["inference"]["guided_refine"] == {"output_stride": 4, "radius_cells": 8, "eps": 0.01}
    assert seg.tile_size_px == 1024 and seg.output_stride == 4
    figures = seg.manifest["metrics"]["cv_refine"]
    assert figures["folds_miou_mean"] == round(table["nested_mean"], 4)
    assert figures["without_refine_folds_miou_mean"] == round(table["grid"]["none"]["mean"], 4)
    assert torch_weights_equal(read_checkpoint(shipped)[0], state)
    scores = seg.predict(np.full((1, 1024, 1024, 3), 200, np.uint8))
    assert scores.shape == (1, 3, 256, 256) and np.allclose(scores.sum(1), 1, atol=1e-3)


def torch_weights_equal(a: dict, b: dict) -> bool:
    """Same tensor names and values: the refinement adds no weights and changes none."""
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_the_mosaic_size_is_read_from_its_line_not_a_folder_name(tmp_path: Path, shared_data: Path) -> None:
    """A temporary folder named like ``fprotoseg-cv-if2y1x0t`` holds ``1x0``; the whole-slide score
    must check the GeoJSON against the mosaic's real size, or every coordinate breaks a rule."""
    import tifffile

    sys.path.insert(0, str(REPO / "bench"))
    from mosaic_eval import mosaic_size

    src = shared_data / "masks" / "wsss4luad" / "test"
    work = tmp_path / "fprotoseg-cv-if2y1x0t"
    (work / "img").mkdir(parents=True)
    (work / "mask").mkdir()
    for name in ("00.png", "01.png"):
        (work / "img" / name).symlink_to(src / "img" / name)
        (work / "mask" / name).symlink_to(src / "mask" / name)
    tools = REPO.parent / "shared" / "tools"
    cmd = [sys.executable, str(tools / "mosaic.py"), str(work / "img"), str(work / "mask")]
    cmd.append(str(work / "mosaic"))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1x0" in proc.stdout  # the folder's name is in the line
    with tifffile.TiffFile(work / "mosaic.tiff") as tif:
        height, width = tif.pages[0].shape[:2]
    assert mosaic_size(proc.stdout) == (width, height)


def test_a_nested_choice_never_looks_at_the_fold_it_scores() -> None:
    """bench/cv_inference chooses the class prior and the refinement this way: for fold k, the point
    best over the *other* folds of k's seed, scored on fold k alone; ties go to the earlier point,
    and a seed with one fold has nothing to choose on."""
    sys.path.insert(0, str(REPO / "bench"))
    from cv_inference import _nested_choice

    # per fold, the score of points a, b, c: fold (0, 0) alone prefers c, the others prefer a or b
    table = {
        (0, 0): {"a": 0.1, "b": 0.2, "c": 0.9},
        (0, 1): {"a": 0.8, "b": 0.5, "c": 0.1},
        (0, 2): {"a": 0.4, "b": 0.6, "c": 0.3},
        (1, 0): {"a": 0.5, "b": 0.5, "c": 0.0},
        (1, 1): {"a": 0.3, "b": 0.3, "c": 0.9},
    }

    def mean_score(folds: list[tuple[int, int]], point: str) -> float:
        return float(np.mean([table[f][point] for f in folds]))

    chosen, nested = _nested_choice(table, ["a", "b", "c"], mean_score)
    # (0,0): a 0.6, b 0.55 on folds 1, 2 -> a, although c is best on fold 0 itself
    assert chosen[(0, 0)] == "a" and nested[(0, 0)] == 0.1
    assert chosen[(0, 1)] == "c" and nested[(0, 1)] == 0.1  # a 0.25, b 0.4, c 0.6
    assert chosen[(0, 2)] == "c" and nested[(0, 2)] == 0.3  # a 0.45, b 0.35, c 0.5
    assert chosen[(1, 0)] == "c" and nested[(1, 0)] == 0.0  # chosen on (1, 1) only, not seed 0
    assert chosen[(1, 1)] == "a" and nested[(1, 1)] == 0.3  # a and b tie at 0.5: the earlier
    with pytest.raises(SystemExit, match="at least two folds"):
        _nested_choice({(0, 0): {}, (1, 0): {}, (1, 1): {}}, ["a"], lambda folds, p: 0.0)


def test_slide_gap_separates_the_tissue_mask_from_the_network_and_chooses_its_opening_nested(
    tmp_path: Path, quick_folds: tuple[Path, Path]
) -> None:
    """bench/slide_gap.py on two fold networks. Fold 0 holds 01.png (alveolar Normal, walls 5-15 µm
    thick): with the tissue mask opened by 8 µm most of its Normal pixels never reach the label map,
    without the opening few do. The crops cut back out of the slide are where mosaic.py put them
    (the command refuses otherwise). The opening radius is chosen on the other fold's slide; a rerun
    with the same --out resumes instead of segmenting again, and adds a reading asked for only then
    (the crops after a JPEG round trip at quality 90, about what the slide's tiles hold) without
    building the mosaic slide again."""
    _, folds = quick_folds
    out = tmp_path / "gap.json"
    cmd = [sys.executable, str(REPO / "bench" / "slide_gap.py"), "--cv", str(folds / "cv_wsss4luad.jsonl")]
    cmd += ["--recipe", "quick", "--open-radius-um", "8,0", "--inference", "checkpoint", "--out", str(out)]
    cmd += ["--keep", str(tmp_path / "keep")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {r["fold"]: r for r in result["folds"]}
    assert set(rows) == {0, 1}
    normal_left_out = (rows[0]["open8_left_out_by_class"][2], rows[0]["open0_left_out_by_class"][2])
    assert normal_left_out[0] > 0.5 and normal_left_out[1] < 0.15  # measured 0.655 and 0.081
    assert rows[0]["all_tissue_left_out_by_class"] == [0.0, 0.0, 0.0]
    for row in rows.values():
        readings = ("crops", "crops_from_slide", "all_tissue_label_map", "open8_polygons", "open0_polygons")
        for key in (*readings, "open0_label_map"):
            assert 0 < row[key] <= 1
        assert abs(row["open0_polygons"] - row["open0_label_map"]) < 0.02  # the polygons trace the map
    for fold, other in ((0, 1), (1, 0)):  # chosen on the other fold's slide, scored on its own
        pick = result["nested_chosen"][f"s0f{fold}"]
        best = max(rows[other]["open8_polygons"], rows[other]["open0_polygons"])
        assert rows[other][f"{pick}_polygons"] == best
        assert result["nested_polygons"][f"s0f{fold}"] == rows[fold][f"{pick}_polygons"]
    png = tmp_path / "fold0.png"  # drawn from the kept slides, beside a second run's (here the same)
    figure = ["--figure", str(png), "--figure-fold", "0", "--figure-beside", str(tmp_path / "keep")]
    figure += ["--crop-jpeg-quality", "90"]
    kept_slide = tmp_path / "keep" / "s0f0" / "mosaic.tiff"
    written_ns = kept_slide.stat().st_mtime_ns
    again = subprocess.run([*cmd, *figure], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert kept_slide.stat().st_mtime_ns == written_ns  # crop readings only: the slide is not built again
    assert again.returncode == 0, again.stderr[-2000:]
    assert "slide, open0" not in again.stdout and "polygons, opening chosen nested" in again.stdout
    assert "crops at JPEG quality 90" in again.stdout and "| crops_jpeg90 |" in again.stdout
    resumed = json.loads(out.read_text())["folds"]
    assert [{k: v for k, v in r.items() if k != "crops_jpeg90"} for r in resumed] == result["folds"]
    for row in resumed:  # the same crops, a little compressed: near the lossless reading
        assert abs(row["crops_jpeg90"] - row["crops"]) < 0.1
    from PIL import Image

    with Image.open(png) as img:  # slide, truth, then open8 and open0 of each run: six panels
        assert img.width > 5.5 * img.height
