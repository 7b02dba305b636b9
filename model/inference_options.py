"""Inference-time options a checkpoint's manifest may carry, applied around the trained network.

Why a module of its own: what happens between the trained weights and the scores the worker
stitches (averaging over the tile's rotations and flips, a per-class prior correction) is chosen by
cross-validation like any other part of a recipe (``bench/cv_inference.py``), so it must travel
with the file that was chosen, not live in a worker flag a deployment can forget. Every option wraps
the network as an ``nn.Module``, so batching, CUDA streams, precision and ``torch.compile`` in
:class:`~fprotoseg.model.segmenter.TorchSegmenter` see one network as before.

Manifest shape (every key optional; absent = the network alone)::

    "inference": {"dihedral_views": 4, "class_log_prior": [0.0, 0.3, -0.2],
                  "guided_refine": {"output_stride": 4, "radius_cells": 4, "eps": 0.01}}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Which of the 8 symmetries of a square tile each view count averages over (k: rotate k % 4 times
# by 90°, then mirror left-right when k >= 4). 2 = a mirror; 4 = both mirrors and the half turn.
VIEWS: dict[int, tuple[int, ...]] = {1: (0,), 2: (0, 4), 4: (0, 2, 4, 6), 8: tuple(range(8))}
OPTIONS = ("dihedral_views", "class_log_prior", "guided_refine")


class ManifestError(ValueError):
    """The manifest's ``inference`` section names an option or value this version cannot apply."""


def _view(x: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.rot90(x, k % 4, dims=(2, 3))
    return torch.flip(out, dims=(3,)) if k >= 4 else out


def _unview(y: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.flip(y, dims=(3,)) if k >= 4 else y
    return torch.rot90(out, -(k % 4), dims=(2, 3))


class DihedralMean(nn.Module):
    """The mean of a dense network's per-cell scores over rotated and mirrored copies of the tile.

    H&E tissue has no up or left, so every view is as valid as the original; their mean cancels
    the part of a from-scratch CAM that depends on orientation (it was trained on all eight).
    Costs ``len(views)`` forward passes per tile.
    """

    def __init__(self, net: nn.Module, views: int) -> None:
        super().__init__()
        if views not in VIEWS:
            raise ManifestError(f"dihedral_views must be one of {sorted(VIEWS)}, got {views!r}")
        self.net = net
        self.views = VIEWS[views]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = _unview(self.net(_view(x, self.views[0])), self.views[0])
        for k in self.views[1:]:
            total = total + _unview(self.net(_view(x, k)), k)
        return total / len(self.views)


class ClassPrior(nn.Module):
    """Per-class log-prior added to a network's class probabilities, renormalised.

    Equivalent to adding the vector to the softmax logits: it moves the decision between classes a
    network confuses (a from-scratch CAM calls part of the stroma tumour) without retraining. Its
    values come from cross-validation, chosen on the other folds' out-of-fold scores.
    """

    def __init__(self, net: nn.Module, log_prior: Sequence[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer(
            "weight",
            torch.exp(torch.tensor(list(log_prior), dtype=torch.float32)).view(1, -1, 1, 1),
            persistent=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.net(x) * self.weight.to(x.dtype)
        return p / p.sum(dim=1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def apply_inference_options(module: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """Wrap ``module`` (already loaded) with what ``manifest["inference"]`` asks for."""
    options = dict(manifest.get("inference") or {})
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ManifestError(f"unknown inference options in the manifest: {', '.join(unknown)}")
    prior = options.get("class_log_prior")
    if prior is not None:
        if len(prior) != len(manifest["classes"]):
            raise ManifestError(
                f"class_log_prior has {len(prior)} values for {len(manifest['classes'])} classes"
            )
        module = ClassPrior(module, [float(v) for v in prior])
    views = int(options.get("dihedral_views", 1))
    if views != 1:
        module = DihedralMean(module, views)
    refine = options.get("guided_refine")
    if refine is not None:
        norm = manifest.get("normalisation", {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]})
        module = GuidedRefine(
            module, int(manifest["output_stride"]), *_refine_args(refine), norm["mean"], norm["std"]
        )
    return module.eval()


def _refine_args(refine: Any) -> tuple[int, int, float]:
    """(output_stride, radius_cells, eps) of a ``guided_refine`` section, or ManifestError."""
    if not isinstance(refine, dict) or set(refine) != {"output_stride", "radius_cells", "eps"}:
        raise ManifestError(f"guided_refine must be {{output_stride, radius_cells, eps}}, got {refine!r}")
    try:
        return int(refine["output_stride"]), int(refine["radius_cells"]), float(refine["eps"])
    except (TypeError, ValueError):
        raise ManifestError(f"guided_refine values must be numbers, got {refine!r}") from None


def inference_geometry(manifest: dict[str, Any]) -> tuple[int, int | None]:
    """(output_stride, receptive_field_px) of the network *with* its inference options.

    The guided refinement scores at its own stride and lets each output cell see ``2 * radius``
    cells further on every side, plus one network cell through the upsampling and one output cell
    through the stitcher's bilinear sampling: the pipeline's tile margin (half the receptive field)
    must cover that, or a border could follow a tile edge.
    """
    stride = int(manifest["output_stride"])
    field = manifest.get("receptive_field_px")
    refine = (manifest.get("inference") or {}).get("guided_refine")
    if refine is None:
        return stride, int(field) if field else None
    out_stride, radius, _ = _refine_args(refine)
    return out_stride, int(field or 0) + 2 * stride + (4 * radius + 2) * out_stride


def _box_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over a (2r+1)² window, counting only pixels inside the tile (no zero padding bias).
    Separable (a column pass, then a row pass): 2(2r+1) reads per pixel, not (2r+1)²."""
    k = 2 * radius + 1
    x = nn.functional.avg_pool2d(x, (k, 1), stride=1, padding=(radius, 0), count_include_pad=False)
    return nn.functional.avg_pool2d(x, (1, k), stride=1, padding=(0, radius), count_include_pad=False)


def guided_filter(guide: torch.Tensor, src: torch.Tensor, radius: int, eps: float) -> torch.Tensor:
    """Colour guided filter (He, Sun and Tang): ``src`` (N, K, h, w) made locally linear in ``guide``
    (N, 3, h, w), so its edges move onto the guide's colour edges and flat regions stay smooth.

    Each output pixel depends on guide and source pixels within ``2 * radius`` of it. The 3x3
    covariance per pixel is inverted in closed form (no batched LAPACK call per tile).
    """
    mean_i = _box_mean(guide, radius)
    mean_p = _box_mean(src, radius)
    # Covariance of the guide's channels, regularised by eps (six unique entries).
    pairs = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))
    cov = {
        (a, b): _box_mean(guide[:, a : a + 1] * guide[:, b : b + 1], radius)
        - mean_i[:, a : a + 1] * mean_i[:, b : b + 1]
        for a, b in pairs
    }
    s00, s01, s02 = cov[0, 0] + eps, cov[0, 1], cov[0, 2]
    s11, s12, s22 = cov[1, 1] + eps, cov[1, 2], cov[2, 2] + eps
    # Inverse of the symmetric 3x3 matrix via cofactors.
    c00, c01, c02 = s11 * s22 - s12 * s12, s02 * s12 - s01 * s22, s01 * s12 - s02 * s11
    c11, c12, c22 = s00 * s22 - s02 * s02, s01 * s02 - s00 * s12, s00 * s11 - s01 * s01
    det = s00 * c00 + s01 * c01 + s02 * c02
    inv = ((c00, c01, c02), (c01, c11, c12), (c02, c12, c22))
    cov_ip = [_box_mean(guide[:, a : a + 1] * src, radius) - mean_i[:, a : a + 1] * mean_p for a in range(3)]
    coeffs = [sum(inv[a][b] * cov_ip[b] for b in range(3)) / det for a in range(3)]
    offset = mean_p - sum(coeffs[a] * mean_i[:, a : a + 1] for a in range(3))
    out = _box_mean(offset, radius)
    for a in range(3):
        out = out + _box_mean(coeffs[a], radius) * guide[:, a : a + 1]
    return out


class GuidedRefine(nn.Module):
    """Class probabilities moved onto the tissue's own colour edges: the network's cell scores are
    upsampled to ``output_stride`` and guided-filtered with the tile itself as the guide.

    Why: a CAM scores 8 µm cells and bilinear upsampling draws its borders as blobs, where gland
    and stroma interleave at 10-20 µm. Tumour, stroma and alveolar walls differ in colour, so a
    filter that keeps the scores locally linear in the RGB image puts each border where the colour
    changes. It has no weights, sees only the tile (its support, ``2 * radius_cells`` output cells,
    is added to the receptive field so the tile margin covers it: no seam), and is chosen by
    cross-validation like the views (``bench/cv_inference.py --refine``).
    """

    def __init__(
        self,
        net: nn.Module,
        network_stride: int,
        output_stride: int,
        radius_cells: int,
        eps: float,
        mean_rgb: Sequence[float],
        std_rgb: Sequence[float],
    ) -> None:
        super().__init__()
        if output_stride < 1 or network_stride % output_stride:
            raise ManifestError(
                f"guided_refine output_stride {output_stride} must divide the network's {network_stride}"
            )
        if radius_cells < 1 or eps <= 0:
            raise ManifestError(
                f"guided_refine needs radius_cells >= 1 and eps > 0, got {radius_cells}, {eps}"
            )
        self.net = net
        self.output_stride = output_stride
        self.radius = radius_cells
        self.eps = float(eps)
        # The network's input is (rgb/255 - mean) / std; the guide is rgb in 0..1 so eps has units.
        self.register_buffer(
            "std", torch.tensor(list(std_rgb), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "mean", torch.tensor(list(mean_rgb), dtype=torch.float32).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.refine(x, self.net(x))

    def refine(self, x: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """The refined (N, K, H/output_stride, W/output_stride) probabilities of the network's
        ``scores`` for the normalised input ``x`` (apart so CV can refine cached scores)."""
        h, w = x.shape[2] // self.output_stride, x.shape[3] // self.output_stride
        guide = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
        if self.output_stride > 1:
            guide = nn.functional.avg_pool2d(guide, self.output_stride)
        up = nn.functional.interpolate(scores.float(), size=(h, w), mode="bilinear", align_corners=False)
        refined = guided_filter(guide, up, self.radius, self.eps).clamp_min(0.0)
        return refined / refined.sum(dim=1, keepdim=True).clamp_min(torch.finfo(refined.dtype).tiny)
