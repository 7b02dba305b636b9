"""H&E stain space: random stain augmentation for training and fixed stain shifts for validation.

Why: slides from another lab or scanner differ first in stain (more haematoxylin, paler eosin,
...), and the project's held-out test crops come from slides this repository never sees. Working in
the optical-density space of Ruifrok & Johnston's stain vectors produces colours a real H&E can
have (RGB gain jitter does not), both for training (:func:`hed_jitter`, Tellez et al. 2018) and
for a validation proxy of "another lab's slide" (:func:`shift_stain` with :data:`STAIN_SHIFTS`).
:func:`stain_jitter` is the plain RGB gain/offset/saturation jitter the recipes combine with it.
"""

from __future__ import annotations

import numpy as np

# Optical density per RGB channel of haematoxylin, eosin and DAB (the residual channel here).
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)

# Fixed (scale H, scale E, shift H, shift E) shifts for validation: more/less haematoxylin, a
# pink (eosin-heavy) and a blue (haematoxylin-heavy) lab. Chosen once, never tuned on scores.
STAIN_SHIFTS: tuple[tuple[float, float, float, float], ...] = (
    (1.25, 0.85, 0.0, 0.0),
    (0.8, 1.2, 0.0, 0.0),
    (1.0, 1.0, -0.05, 0.12),
    (1.0, 1.0, 0.12, -0.05),
)


def _hed_affine(batch: np.ndarray, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) -> uint8 with stain densities ``hed * alpha + beta`` ((N, 3) each)."""
    od = -np.log(np.maximum(batch.astype(np.float64), 1.0) / 255.0)  # optical density, >= 0
    hed = od @ _HED_FROM_RGB
    hed = hed * alpha[:, None, None, :] + beta[:, None, None, :]
    out = np.maximum(hed @ _RGB_FROM_HED, 0.0)
    return np.clip(255.0 * np.exp(-out), 0, 255).astype(np.uint8)


def hed_jitter(batch: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Per image, scale and shift the H, E and residual densities by U(1-s, 1+s) and U(-s, s)."""
    if sigma <= 0:
        return batch
    n = batch.shape[0]
    alpha = rng.uniform(1 - sigma, 1 + sigma, size=(n, 3))
    beta = rng.uniform(-sigma, sigma, size=(n, 3))
    return _hed_affine(batch, alpha, beta)


def stain_jitter(
    batch: np.ndarray, rng: np.random.Generator, colour: float, saturation: float = 0.0
) -> np.ndarray:
    """Stain variation between slides dominates colour: jitter channel gains/offsets and
    saturation per image so the network has to rely on texture, not on one lab's H&E tint."""
    if colour <= 0 and saturation <= 0:
        return batch
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        f = img.astype(np.float32)
        grey = f.mean(axis=2, keepdims=True)
        if saturation > 0:
            f = grey + (f - grey) * (1.0 + rng.uniform(-saturation, saturation))
        f = f * (1.0 + rng.uniform(-colour, colour, size=3)) + rng.uniform(-colour, colour, size=3) * 40.0
        out[i] = np.clip(f, 0, 255).astype(np.uint8)
    return out


def shift_stain(rgb: np.ndarray, shift: tuple[float, float, float, float]) -> np.ndarray:
    """One image (H, W, 3) restained by one of :data:`STAIN_SHIFTS` (white stays white)."""
    scale_h, scale_e, shift_h, shift_e = shift
    alpha = np.array([[scale_h, scale_e, 1.0]])
    beta = np.array([[shift_h, shift_e, 0.0]])
    out = _hed_affine(rgb[None], alpha, beta)[0]
    # a shift of the densities would also tint empty glass; keep glass white as a scanner does
    glass = (rgb.astype(np.int16).min(axis=2) > 225)[..., None]
    return np.where(glass, rgb, out)
