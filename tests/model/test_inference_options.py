"""Inference-time options carried by a checkpoint's manifest: they load through the same seam as
the network, change the scores as their definitions say, and an option this version does not know
stops the load instead of being ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fprotoseg.model import DEFAULT_CHECKPOINT
from fprotoseg.model.checkpoint import read_checkpoint, save_checkpoint
from fprotoseg.model.errors import CheckpointError
from fprotoseg.model.inference_options import ClassPrior, DihedralMean, GuidedRefine, inference_geometry

pytestmark = pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="packaged default not built")


def _tile(shared_data: Path, size_px: int = 256) -> np.ndarray:
    from fprotoseg.model.training.datasets import load_pairs

    (pair,) = load_pairs(shared_data / "masks" / "wsss4luad" / "test", ["68.png"])
    return np.ascontiguousarray(pair.rgb[:size_px, :size_px])


def _with_inference(tmp_path: Path, inference: dict) -> Path:
    """The packaged network with ``inference`` in place of whatever options it ships with."""
    state, manifest = read_checkpoint(DEFAULT_CHECKPOINT)
    manifest["inference"] = inference
    out = tmp_path / f"with_inference_{len(list(tmp_path.iterdir()))}.safetensors"
    save_checkpoint(out, state, manifest)
    return out


def test_eight_view_mean_is_exactly_rotation_equivariant_on_real_tissue(
    shared_data: Path, tmp_path: Path
) -> None:
    """The mean over all eight views of a rotated tile is the rotated mean (group averaging), which
    the plain network is not: its CAM depends on orientation."""
    from fprotoseg.model import load_segmenter

    tile = _tile(shared_data)[None]
    rotated = np.ascontiguousarray(np.rot90(tile, 1, axes=(1, 2)))
    plain = load_segmenter(_with_inference(tmp_path, {}), device="cpu")
    seg = load_segmenter(_with_inference(tmp_path, {"dihedral_views": 8}), device="cpu")
    assert isinstance(seg.module, DihedralMean)
    a = np.rot90(seg.predict(tile), 1, axes=(2, 3))
    b = seg.predict(rotated)
    assert np.abs(a - b).max() < 1e-4
    plain_gap = np.abs(np.rot90(plain.predict(tile), 1, axes=(2, 3)) - plain.predict(rotated)).max()
    assert plain_gap > 100 * np.abs(a - b).max()
    np.testing.assert_allclose(b.sum(axis=1), 1.0, atol=1e-4)  # still class probabilities


def test_class_prior_moves_the_decision_and_keeps_probabilities(shared_data: Path, tmp_path: Path) -> None:
    from fprotoseg.model import load_segmenter

    tile = _tile(shared_data)[None]
    plain = load_segmenter(_with_inference(tmp_path, {}), device="cpu").predict(tile)
    seg = load_segmenter(_with_inference(tmp_path, {"class_log_prior": [0.0, 0.0, 0.0]}), device="cpu")
    assert isinstance(seg.module, ClassPrior)
    np.testing.assert_allclose(seg.predict(tile), plain, atol=1e-5)  # a zero prior changes nothing
    stroma = load_segmenter(_with_inference(tmp_path, {"class_log_prior": [0.0, 0.7, 0.0]}), device="cpu")
    moved = stroma.predict(tile)
    np.testing.assert_allclose(moved.sum(axis=1), 1.0, atol=1e-4)
    assert (moved.argmax(1) == 1).mean() > (plain.argmax(1) == 1).mean()
    expected = plain * np.exp([0.0, 0.7, 0.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(moved, expected / expected.sum(1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize(
    "inference",
    [
        {"dihedral_views": 3},
        {"class_log_prior": [0.0, 1.0]},
        {"sharpen": True},
        {"guided_refine": {"output_stride": 3, "radius_cells": 4, "eps": 0.01}},  # 3 does not divide 8
        {"guided_refine": {"output_stride": 4, "radius_cells": 0, "eps": 0.01}},
        {"guided_refine": {"output_stride": 4, "radius_cells": 4, "eps": -1}},
        {"guided_refine": {"output_stride": 4, "radius_cells": 4}},
        {"guided_refine": {"output_stride": "four", "radius_cells": 4, "eps": 0.01}},
        {"guided_refine": [4, 4, 0.01]},
    ],
)
def test_an_option_this_version_cannot_apply_stops_the_load(tmp_path: Path, inference: dict) -> None:
    from fprotoseg.model import load_segmenter

    with pytest.raises(CheckpointError):
        load_segmenter(_with_inference(tmp_path, inference), device="cpu")


def test_every_view_is_undone_exactly() -> None:
    """A network that hands back its input's first channel: each view's inverse must restore the
    original pixel grid, so the mean over any view count is the input itself (no transposed or
    shifted copy mixed in)."""

    class FirstChannel(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1]

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    for views in (2, 4, 8):
        torch.testing.assert_close(DihedralMean(FirstChannel(), views)(x), x[:, :1])


REFINE = {"output_stride": 4, "radius_cells": 8, "eps": 0.01}


def _two_textures(shared_data: Path, border_x_px: int, side_px: int = 256) -> np.ndarray:
    """Normal lung left of a vertical border, tumour right of it: real pixels of 68.png."""
    from fprotoseg.model.training.datasets import load_pairs

    (pair,) = load_pairs(shared_data / "masks" / "wsss4luad" / "test", ["68.png"])
    normal, tumour = pair.rgb[0:side_px, 0:side_px], pair.rgb[1400 : 1400 + side_px, 0:side_px]
    tile = tumour.copy()
    tile[:, :border_x_px] = normal[:, :border_x_px]
    return np.ascontiguousarray(tile)


def test_guided_refinement_loads_from_the_manifest_with_its_geometry(
    shared_data: Path, tmp_path: Path
) -> None:
    """The option changes the output stride and grows the receptive field by its filter's support,
    and still hands back class probabilities."""
    from fprotoseg.model import load_segmenter

    seg = load_segmenter(
        _with_inference(tmp_path, {"dihedral_views": 4, "guided_refine": REFINE}), device="cpu"
    )
    plain = load_segmenter(_with_inference(tmp_path, {"dihedral_views": 4}), device="cpu")
    assert isinstance(seg.module, GuidedRefine)
    assert (seg.output_stride, seg.network_stride_px) == (4, 8)
    assert (plain.output_stride, plain.network_stride_px) == (8, None)
    assert plain.receptive_field_px is not None and seg.receptive_field_px is not None
    # 2 network cells (upsampling) + 2 * 2 * radius output cells (the filter) + 2 output cells.
    assert seg.receptive_field_px == plain.receptive_field_px + 2 * 8 + (4 * 8 + 2) * 4
    assert inference_geometry(seg.manifest) == (4, seg.receptive_field_px)
    scores = seg.predict(_tile(shared_data)[None])
    assert scores.shape == (1, 3, 64, 64)
    assert scores.min() >= 0.0
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-4)


def test_guided_refinement_puts_the_border_where_the_tissue_changes(
    shared_data: Path, tmp_path: Path
) -> None:
    """A border between two real textures, half a network cell off the cell grid: the network's
    8 µm cells place it to within their size; the refinement, guided by the colours, places it
    closer. Measured per row as the column where the normal class ends."""
    from fprotoseg.model import load_segmenter

    border_px = 132  # 16.5 cells of 8 px
    tile = _two_textures(shared_data, border_px)[None]
    errors = {}
    for name, inference in (("cells", {}), ("refined", {"guided_refine": REFINE})):
        seg = load_segmenter(_with_inference(tmp_path, inference), device="cpu")
        scores = seg.predict(tile)
        up = torch.nn.functional.interpolate(torch.from_numpy(scores), size=(256, 256), mode="bilinear")
        labels = up[0].argmax(0).numpy()
        normal = labels == 2
        assert normal[:, :100].mean() > 0.6 and normal[:, 170:].mean() < 0.1, name  # both sides found
        # Per row: the column that best splits normal (left) from the rest (right).
        left = np.cumsum(normal, axis=1)
        right = np.cumsum((~normal)[:, ::-1], axis=1)[:, ::-1]
        split = (np.pad(left, ((0, 0), (1, 0)))[:, :-1] + right).argmax(axis=1)
        errors[name] = float(np.median(np.abs(split - border_px)))
    # Measured: 12 px for the cells, 2 px refined (1 µm/px).
    assert errors["refined"] <= 4 and errors["refined"] < errors["cells"] / 2, errors
