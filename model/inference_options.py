"""Inference-time options a checkpoint's manifest may carry, applied around the trained network.

Why a module of its own: what happens between the trained weights and the scores the worker
stitches (averaging over the tile's rotations and flips, a per-class prior correction) is chosen by
cross-validation like any other part of a recipe (``bench/cv_inference.py``), so it must travel
with the file that was chosen, not live in a worker flag a deployment can forget. Both options wrap
the network as an ``nn.Module``, so batching, CUDA streams, precision and ``torch.compile`` in
:class:`~fprotoseg.model.segmenter.TorchSegmenter` see one network as before.

Manifest shape (every key optional; absent = the network alone)::

    "inference": {"dihedral_views": 4, "class_log_prior": [0.0, 0.3, -0.2]}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

# Which of the 8 symmetries of a square tile each view count averages over (k: rotate k % 4 times
# by 90°, then mirror left-right when k >= 4). 2 = a mirror; 4 = both mirrors and the half turn.
VIEWS: dict[int, tuple[int, ...]] = {1: (0,), 2: (0, 4), 4: (0, 2, 4, 6), 8: tuple(range(8))}


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
    unknown = sorted(set(options) - {"dihedral_views", "class_log_prior"})
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
    return module.eval()
