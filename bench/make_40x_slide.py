"""Write a 40x-sized test slide: a pyramidal tiled TIFF of real tissue, by default 50,000 x 40,000 px.

Why: a lab's real slides are 40x scans (0.25 µm/px) of about 100,000 x 80,000 px with the usual
4x and 16x reduced levels; the slides in ``../shared/data`` are all small. This builds one of
that kind from real pixels, so the pipeline's feed rate, the pyramid level it reads and its peak
memory can be measured on the size that matters, on any machine, without shipping gigabytes.

What it is: level 0 at 0.25 µm/px (the BCSS-WSSS patches of ``../shared/data/bcss_wsss``: real
H&E at 0.25 µm/px, 224 px = 56 µm each), laid on a 56 µm grid, each cell one patch in one of its
8 rotations/flips chosen by a hash of the cell, inside two tissue sections (ellipses with glass
lumina) that cover about half the slide; the rest is glass. Levels 1 (4x, 1.0 µm/px) and 2 (16x,
4.0 µm/px) are drawn from the patches box-downsampled by 4 and 16 (the cells stay aligned, so
they equal a box downsample of level 0 away from section edges). JPEG q90 in 256 px tiles,
resolution tags in centimetres (OpenSlide reports ``openslide.mpp-x`` = 0.25), BigTIFF.

Nothing is held slide-sized: tiles are rendered one at a time from a few MB of patches, and
tifffile compresses them in threads. About 2-4 minutes and 0.6-1 GB on disk for the default size
on a 2-core VM. Written under /tmp (never commit it).

    python bench/make_40x_slide.py                       # /tmp/fprotoseg-bench/slide-40x-50000x40000.tiff
    python bench/make_40x_slide.py --width-px 100000 --height-px 80000 --out /tmp/big.tiff
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FPROTOSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
PATCH_DIR = SHARED / "bcss_wsss" / "training"
LEVEL0_MPP = 0.25
PATCH_PX = 224  # BCSS-WSSS patches: 224 px at 0.25 µm/px
DOWNSAMPLES = (1, 4, 16)
TILE_PX = 256
GLASS_RGB = np.array([242, 241, 244], dtype=np.uint8)
DEFAULT_OUT_DIR = Path("/tmp/fprotoseg-bench")

# Two tissue sections (centre x, centre y, radius x, radius y; fractions of the slide) and glass
# lumina inside them (centre x, centre y, radius; fractions of the width): ~53% tissue.
SECTIONS = ((0.33, 0.50, 0.28, 0.42), (0.76, 0.46, 0.20, 0.32))
LUMINA = ((0.25, 0.38, 0.035), (0.40, 0.64, 0.05), (0.78, 0.40, 0.03))


def default_path(width_px: int, height_px: int) -> Path:
    """Where the bench looks for (and caches) the slide of this size."""
    return DEFAULT_OUT_DIR / f"slide-40x-{width_px}x{height_px}.tiff"


def load_patches(downsample: int) -> np.ndarray:
    """All real patches, box-downsampled by ``downsample``: (K, s, s, 3) uint8, s = 224 / downsample."""
    import cv2
    from PIL import Image

    paths = sorted(PATCH_DIR.glob("*.png"))
    if not paths:
        raise SystemExit(f"no BCSS-WSSS patches under {PATCH_DIR} (set FPROTOSEG_SHARED_DATA)")
    side = PATCH_PX // downsample
    out = np.empty((len(paths), side, side, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        out[i] = rgb if downsample == 1 else cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA)
    return out


def _dihedral(patch: np.ndarray, variant: int) -> np.ndarray:
    """One of the 8 rotations/flips of a square patch (a view)."""
    rotated = np.rot90(patch, variant % 4)
    return rotated[:, ::-1] if variant >= 4 else rotated


def tissue_mask(xs_um: np.ndarray, ys_um: np.ndarray, width_um: float, height_um: float) -> np.ndarray:
    """Boolean (len(ys), len(xs)): inside a section and outside its lumina."""
    x, y = xs_um[None, :], ys_um[:, None]
    inside = np.zeros((ys_um.size, xs_um.size), dtype=bool)
    for cx, cy, rx, ry in SECTIONS:
        dx, dy = (x - cx * width_um) / (rx * width_um), (y - cy * height_um) / (ry * height_um)
        inside |= dx**2 + dy**2 <= 1
    for cx, cy, r in LUMINA:
        inside &= (x - cx * width_um) ** 2 + (y - cy * height_um) ** 2 > (r * width_um) ** 2
    return inside


def _cell_choice(cell_row: int, cell_col: int, patch_count: int) -> tuple[int, int]:
    """(patch index, dihedral variant) of a grid cell: a fixed hash, the same on every level."""
    h = (cell_row * 73856093) ^ (cell_col * 19349663)
    return h % patch_count, (h // patch_count) % 8


def iter_level_tiles(
    patches: np.ndarray, level_mpp: float, width_px: int, height_px: int, width_um: float, height_um: float
) -> Iterator[np.ndarray]:
    """The level's 256 px tiles in row-major order, rendered from ``patches`` (cell side = their side)."""
    cell = patches.shape[1]
    k = patches.shape[0]
    glass_tile = np.broadcast_to(GLASS_RGB, (TILE_PX, TILE_PX, 3))
    for ty in range(0, height_px, TILE_PX):
        ys_um = (np.arange(ty, ty + TILE_PX) + 0.5) * level_mpp
        for tx in range(0, width_px, TILE_PX):
            xs_um = (np.arange(tx, tx + TILE_PX) + 0.5) * level_mpp
            mask = tissue_mask(xs_um, ys_um, width_um, height_um)
            if not mask.any():
                yield np.ascontiguousarray(glass_tile)
                continue
            tile = np.empty((TILE_PX, TILE_PX, 3), dtype=np.uint8)
            # Copy whole cell blocks (at most 3 x 3 per tile at level 0): memcpy, not per-pixel indexing.
            for cr in range(ty // cell, (ty + TILE_PX - 1) // cell + 1):
                y0, y1 = max(ty, cr * cell), min(ty + TILE_PX, (cr + 1) * cell)
                for cc in range(tx // cell, (tx + TILE_PX - 1) // cell + 1):
                    x0, x1 = max(tx, cc * cell), min(tx + TILE_PX, (cc + 1) * cell)
                    index, variant = _cell_choice(cr, cc, k)
                    src = _dihedral(patches[index], variant)
                    tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = src[
                        y0 - cr * cell : y1 - cr * cell, x0 - cc * cell : x1 - cc * cell
                    ]
            tile[~mask] = GLASS_RGB
            yield tile


def write_slide(path: Path, width_px: int, height_px: int, *, jpeg_quality: int = 90) -> Path:
    """Write the pyramid to ``path`` (via a temporary name, so a killed run leaves no half slide)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    width_um, height_um = width_px * LEVEL0_MPP, height_px * LEVEL0_MPP
    with tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        for level, downsample in enumerate(DOWNSAMPLES):
            mpp = LEVEL0_MPP * downsample
            w, h = math.ceil(width_px / downsample), math.ceil(height_px / downsample)
            patches = load_patches(downsample)
            tif.write(
                iter_level_tiles(patches, mpp, w, h, width_um, height_um),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE_PX, TILE_PX),
                compression="jpeg",
                compressionargs={"level": jpeg_quality},
                photometric="rgb",
                subfiletype=0 if level == 0 else 1,
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                metadata=None,
                maxworkers=os.cpu_count() or 1,
            )
    tmp.rename(path)
    return path


def ensure_slide(width_px: int = 50_000, height_px: int = 40_000, path: Path | None = None) -> Path:
    """The slide at ``path`` (default under /tmp), written once and reused."""
    path = path or default_path(width_px, height_px)
    if not path.exists():
        write_slide(path, width_px, height_px)
    return path


def tissue_fraction(width_px: int, height_px: int, samples: int = 1000) -> float:
    """Fraction of the slide area inside tissue (sampled on a grid; the glass share is 1 minus it)."""
    w_um, h_um = width_px * LEVEL0_MPP, height_px * LEVEL0_MPP
    xs = (np.arange(samples) + 0.5) * w_um / samples
    ys = (np.arange(samples) + 0.5) * h_um / samples
    return float(tissue_mask(xs, ys, w_um, h_um).mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width-px", type=int, default=50_000)
    ap.add_argument("--height-px", type=int, default=40_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--force", action="store_true", help="rewrite even if the file exists")
    args = ap.parse_args(argv)
    path = args.out or default_path(args.width_px, args.height_px)
    t0 = time.perf_counter()
    if args.force or not path.exists():
        write_slide(path, args.width_px, args.height_px)
    print(
        f"{path}: {args.width_px}x{args.height_px} px at {LEVEL0_MPP} µm/px, levels x{DOWNSAMPLES}, "
        f"tissue {tissue_fraction(args.width_px, args.height_px):.0%}, "
        f"{path.stat().st_size / 2**20:.0f} MiB, {time.perf_counter() - t0:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
