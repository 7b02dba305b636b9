"""Macenko stain normalisation: every image restained to the training crops' typical H&E.

Why: the first slide a lab sends differs from the training crops first in stain (another
haematoxylin, paler eosin, another scanner's colour response). Normalisation maps each image's
two stain densities onto the reference measured over the training crops, at training (per crop:
each WSSS4LUAD crop comes from its own slide) and at inference (per slide, from the optical
densities the QC stage samples over the whole tissue: one estimate per slide, so no tile can be
restained differently from its neighbour and show a seam).

Method (Macenko et al. 2009): the optical densities (OD) of a two-stain image lie near the plane of
its two stain vectors; the plane is spanned by the two main eigenvectors of the OD scatter and the
stains are the directions at its extreme (1st/99th percentile) angles. Each pixel's OD is split
into haematoxylin and eosin concentrations, these are scaled so their 99th percentiles match the
reference, and recombined with the reference vectors. Glass (OD ~ 0) stays white.

A checkpoint that normalises says so in its manifest (``stain_norm``, :meth:`StainEstimate.as_json`);
one without it sees its pixels unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "macenko"
STAINED_MIN_OD = 0.3  # summed RGB optical density: below it a pixel is nearly glass
ANGLE_PERCENTILE = 1.0  # the extreme angles (1st/99th percentile) in the OD plane
CONCENTRATION_PERCENTILE = 99.0
MIN_SAMPLES = 500
MAX_SAMPLES = 200_000  # a random subset is as good for a 2x3 matrix and two percentiles
# optical density per uint8 value (a table look-up, not a log per pixel); 0 and 1 both read as 1
OD_LUT = (-np.log(np.maximum(np.arange(256), 1) / 255.0)).astype(np.float32)


def stain_vectors(od: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(haematoxylin, eosin) unit OD vectors of (n, 3) optical densities, None below
    :data:`MIN_SAMPLES`. The one absorbing more red is haematoxylin."""
    od = np.asarray(od, dtype=np.float64)
    if len(od) < MIN_SAMPLES:
        return None
    _, vecs = np.linalg.eigh(od.T @ od / len(od))
    plane = vecs[:, [2, 1]]
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)
    proj = od @ plane
    angles = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(angles, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    a = plane @ np.array([math.cos(lo), math.sin(lo)])
    b = plane @ np.array([math.cos(hi), math.sin(hi)])
    a, b = a / np.linalg.norm(a), b / np.linalg.norm(b)
    a *= 1 if a.sum() >= 0 else -1
    b *= 1 if b.sum() >= 0 else -1
    return (a, b) if a[0] >= b[0] else (b, a)


def stained_od(rgb: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """(n, 3) optical densities of the stained pixels of an (H, W, 3) uint8 image (at most
    :data:`MAX_SAMPLES`, drawn at random with a fixed seed)."""
    od = OD_LUT[np.asarray(rgb, dtype=np.uint8).reshape(-1, 3)]
    od = od[od.sum(axis=1) > STAINED_MIN_OD]
    if len(od) > MAX_SAMPLES:
        rng = rng or np.random.default_rng(0)
        od = od[rng.choice(len(od), MAX_SAMPLES, replace=False)]
    return od


@dataclass(frozen=True)
class StainEstimate:
    """An image's (or the reference's) stain matrix, rows H and E, and the 99th percentile of
    each stain's concentration."""

    stains: np.ndarray  # (2, 3) unit OD vectors
    max_concentration: np.ndarray  # (2,)

    @classmethod
    def of_od(cls, od: np.ndarray) -> StainEstimate | None:
        """From stained optical densities; None when there are too few to estimate from."""
        vectors = stain_vectors(od)
        if vectors is None:
            return None
        stains = np.stack(vectors)
        conc = np.asarray(od, np.float64) @ np.linalg.pinv(stains)
        max_c = np.percentile(conc, CONCENTRATION_PERCENTILE, axis=0)
        if not np.all(max_c > 1e-3):
            return None
        return cls(stains, max_c)

    @classmethod
    def of_image(cls, rgb: np.ndarray) -> StainEstimate | None:
        return cls.of_od(stained_od(rgb))

    @classmethod
    def reference(cls, estimates: Sequence[StainEstimate]) -> StainEstimate:
        """The typical stain of many images: the median of their vectors and of their maxima
        (a median, so one odd crop cannot pull the reference)."""
        if not estimates:
            raise ValueError("no stain estimates to take a reference from")
        stains = np.median(np.stack([e.stains for e in estimates]), axis=0)
        stains /= np.linalg.norm(stains, axis=1, keepdims=True)
        return cls(stains, np.median(np.stack([e.max_concentration for e in estimates]), axis=0))

    def as_json(self) -> dict[str, Any]:
        return {
            "method": METHOD,
            "stains": {"haematoxylin": _rounded(self.stains[0]), "eosin": _rounded(self.stains[1])},
            "max_concentration": _rounded(self.max_concentration),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StainEstimate:
        """The manifest's ``stain_norm``; a method this version does not know is refused."""
        if doc.get("method") != METHOD:
            raise ValueError(f"stain_norm method {doc.get('method')!r} is not {METHOD!r}")
        stains = np.array([doc["stains"]["haematoxylin"], doc["stains"]["eosin"]], dtype=np.float64)
        max_c = np.array(doc["max_concentration"], dtype=np.float64)
        if stains.shape != (2, 3) or max_c.shape != (2,) or not np.all(max_c > 0):
            raise ValueError("stain_norm needs two 3-vectors and two positive maxima")
        return cls(stains, max_c)


def _rounded(v: np.ndarray) -> list[float]:
    return [round(float(x), 5) for x in v]


class StainNormaliser:
    """Restains uint8 RGB pixels from a source estimate to a target (the reference).

    The whole map is one 3x3 matrix on optical densities (split into H and E with the source's
    vectors, rescale each, recombine with the target's), so a batch of tiles costs a table
    look-up, a matrix product and an exponential per pixel. What is in neither stain (the OD
    residual off the H&E plane) is dropped, as Macenko's method does.
    """

    def __init__(self, source: StainEstimate, target: StainEstimate) -> None:
        scale = target.max_concentration / source.max_concentration
        self.source, self.target = source, target
        self.od_map = (np.linalg.pinv(source.stains) * scale[None, :] @ target.stains).astype(np.float32)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(..., 3) uint8 -> (..., 3) uint8 restained."""
        od = OD_LUT[rgb] @ self.od_map
        np.maximum(od, 0.0, out=od)
        np.exp(-od, out=od)
        od *= 255.0
        return np.clip(od, 0, 255).astype(np.uint8)


def normaliser_for(manifest: dict[str, Any], source: StainEstimate | None) -> StainNormaliser | None:
    """The normaliser a checkpoint asks for, from the image's own estimate; None when the
    checkpoint does not normalise or the image has too little stained tissue to estimate from."""
    doc = manifest.get("stain_norm")
    if not doc or source is None:
        return None
    return StainNormaliser(source, StainEstimate.from_json(doc))


def normalise_image(manifest: dict[str, Any], rgb: np.ndarray) -> np.ndarray:
    """One image (a crop evaluated alone) restained from its own estimate, as the checkpoint asks;
    unchanged when it does not normalise."""
    if not manifest.get("stain_norm"):
        return rgb
    normaliser = normaliser_for(manifest, StainEstimate.of_image(rgb))
    return normaliser(rgb) if normaliser is not None else rgb
