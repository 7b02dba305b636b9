"""The tile grid at the model's resolution, over tissue only, with overlap.

Geometry in one place. Three coordinate systems meet here:
- model pixels (``model_mpp`` µm/px): the grid; tile ``(row, col)`` *owns* model pixels
  ``[col*step, (col+1)*step)`` and reads ``margin`` more on every side (the overlap);
- level pixels of the pyramid level the tile is read from (the coarsest level at least as fine as
  the model, so level 0 is decoded only when nothing coarser serves);
- output pixels (``output_mpp``): the label map. Each tile owns the output pixels whose centres
  fall in its owned model-pixel range, so neighbours abut exactly and every output pixel comes
  from the centre of exactly one tile.
Each tile also records the exact µm rectangle it read (after rounding to whole level pixels), so
the stitcher places scores where they came from, with no half-pixel drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fprotoseg.worker.wsi.slide import Slide
from fprotoseg.worker.wsi.tissue import TissueMask


@dataclass(frozen=True)
class Tile:
    """One network input: what to read, where its scores land, which output pixels it owns."""

    row: int
    col: int
    level: int
    read_x_px: int  # level pixels
    read_y_px: int
    read_w_px: int
    read_h_px: int
    origin_x_um: float  # µm from the slide's top-left corner of the rectangle read
    origin_y_um: float
    span_x_um: float
    span_y_um: float
    own_x0: int  # output-map pixels owned (half-open)
    own_y0: int
    own_x1: int
    own_y1: int
    # Every mask pixel the stitcher may sample for this tile is tissue (found while planning, on
    # the window the plan unpacks anyway): the stitcher skips its own tissue check.
    inside_tissue: bool = False


@dataclass(frozen=True)
class TileGrid:
    tiles: list[Tile]
    grid_rows: int
    grid_cols: int
    level: int
    level_mpp: float
    model_mpp: float
    tile_size_px: int
    margin_px: int
    step_px: int
    output_mpp: float
    output_shape: tuple[int, int]  # (height, width) of the label map

    @property
    def grid_total(self) -> int:
        return self.grid_rows * self.grid_cols


# Row neighbours read as one region at most (a 256 px tile run of 8 at a 192 px step: 1,600 x 256 px).
MAX_RUN_TILES = 8


def default_margin_px(
    tile_size_px: int,
    output_stride: int,
    receptive_field_px: int | None = None,
    cell_stride_px: int | None = None,
) -> int:
    """About 1/8 of the tile per side (a multiple of the output stride, at least one).

    Why: a CNN's outermost feature cells see the zero padding, not tissue, and their class
    scores drift. On the validation mosaic of the WSSS4LUAD default (256 px tiles, encoder
    stride 16) margins of 0, 8 and 16 px gave slide mIoU 0.671-0.675, 24 px 0.694 and 32-64 px
    0.703-0.712 (Normal moved most): two feature cells of overlap, 1/8 of the tile, keep every
    owned pixel's receptive field on the slide, at 1.36x the tiles of a 1/16 margin.

    A network that states its ``receptive_field_px`` (in its manifest) gets at least half of it
    plus one output cell (the bilinear neighbour an owned pixel is sampled from): then every owned
    pixel is scored from slide pixels only, exactly as one pass over the whole slide would score
    it, and no class border can follow a tile edge.

    ``cell_stride_px``: the network's own cell stride where the output is finer than it (a guided
    refinement). The margin is then a multiple of both, so every tile's cells lie on the one grid a
    single pass over the slide would use, not half a cell beside it.
    """
    stride = math.lcm(max(1, output_stride), max(1, cell_stride_px or 1))
    margin = max(stride, round(tile_size_px / 8 / stride) * stride)
    if receptive_field_px:
        margin = max(margin, math.ceil((receptive_field_px // 2 + stride) / stride) * stride)
    return margin


def output_shape(slide: Slide, output_mpp: float) -> tuple[int, int]:
    """(height, width) of the label map covering the slide at ``output_mpp``."""
    return (
        max(1, math.ceil(slide.height_px * slide.mpp / output_mpp)),
        max(1, math.ceil(slide.width_px * slide.mpp / output_mpp)),
    )


def plan_tiles(
    slide: Slide,
    tissue: TissueMask,
    *,
    model_mpp: float,
    tile_size_px: int,
    output_stride: int,
    output_mpp: float,
    margin_px: int | None = None,
    receptive_field_px: int | None = None,
    cell_stride_px: int | None = None,
) -> TileGrid:
    """All grid tiles whose owned area touches tissue, in row-major order."""
    if margin_px is None:
        margin = default_margin_px(tile_size_px, output_stride, receptive_field_px, cell_stride_px)
    else:
        margin = int(margin_px)
    step = tile_size_px - 2 * margin
    if step <= 0:
        raise ValueError(f"overlap margin {margin} px leaves no tile centre in {tile_size_px} px tiles")
    level = slide.best_level_for_mpp(model_mpp)
    level_mpp = slide.level_mpp(level)
    level_px_per_model_px = model_mpp / level_mpp
    width_model_px = slide.width_px * slide.mpp / model_mpp
    height_model_px = slide.height_px * slide.mpp / model_mpp
    cols = max(1, math.ceil(width_model_px / step))
    rows = max(1, math.ceil(height_model_px / step))
    out_h, out_w = output_shape(slide, output_mpp)
    out_per_model = model_mpp / output_mpp

    def owned(index: int, count: int, limit: int) -> tuple[int, int]:
        a = min(limit, round(index * step * out_per_model))
        b = limit if index + 1 == count else min(limit, round((index + 1) * step * out_per_model))
        return a, b

    # "Any tissue here?" on the owned window grown by one mask pixel (the stitcher interpolates
    # the mask, so a pixel next to tissue can become tissue). Slices, no slide-sized temporaries.
    t_per_out = output_mpp / tissue.mpp
    th, tw = tissue.shape

    read_size = round(tile_size_px * level_px_per_model_px)
    tiles: list[Tile] = []
    for r in range(rows):
        oy0, oy1 = owned(r, rows, out_h)
        if oy1 <= oy0:
            continue
        ty0, ty1 = max(0, math.floor(oy0 * t_per_out) - 1), min(th, math.ceil(oy1 * t_per_out) + 1)
        for c in range(cols):
            ox0, ox1 = owned(c, cols, out_w)
            if ox1 <= ox0:
                continue
            tx0, tx1 = max(0, math.floor(ox0 * t_per_out) - 1), min(tw, math.ceil(ox1 * t_per_out) + 1)
            window = tissue.window(ty0, ty1, tx0, tx1) if ty1 > ty0 and tx1 > tx0 else None
            if window is None or not window.any():
                continue
            lx = round((c * step - margin) * level_px_per_model_px)
            ly = round((r * step - margin) * level_px_per_model_px)
            tiles.append(
                Tile(
                    row=r,
                    col=c,
                    level=level,
                    read_x_px=lx,
                    read_y_px=ly,
                    read_w_px=read_size,
                    read_h_px=read_size,
                    origin_x_um=lx * level_mpp,
                    origin_y_um=ly * level_mpp,
                    span_x_um=read_size * level_mpp,
                    span_y_um=read_size * level_mpp,
                    own_x0=ox0,
                    own_y0=oy0,
                    own_x1=ox1,
                    own_y1=oy1,
                    inside_tissue=bool(window.all()),
                )
            )
    return TileGrid(
        tiles=tiles,
        grid_rows=rows,
        grid_cols=cols,
        level=level,
        level_mpp=level_mpp,
        model_mpp=model_mpp,
        tile_size_px=tile_size_px,
        margin_px=margin,
        step_px=step,
        output_mpp=output_mpp,
        output_shape=(out_h, out_w),
    )


def read_tile(slide: Slide, tile: Tile, tile_size_px: int, out: np.ndarray | None = None) -> np.ndarray:
    """RGB uint8 (T, T, 3) at the model's resolution (INTER_AREA: a true average when shrinking).

    Runs in the reader threads: decoding and resampling both release the GIL. With ``out`` (a
    C-contiguous (T, T, 3) slot of the batch buffer) the tile lands in place, with no copy when
    the level read already is the model's resolution (the usual case on a 40x pyramid).
    """
    import cv2

    same_size = tile.read_w_px == tile_size_px and tile.read_h_px == tile_size_px
    if same_size:
        return slide.read_level(
            tile.level, tile.read_x_px, tile.read_y_px, tile.read_w_px, tile.read_h_px, out=out
        )
    img = slide.read_level(tile.level, tile.read_x_px, tile.read_y_px, tile.read_w_px, tile.read_h_px)
    shrinking = img.shape[1] > tile_size_px
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    if out is None:
        return cv2.resize(img, (tile_size_px, tile_size_px), interpolation=interpolation)
    cv2.resize(img, (tile_size_px, tile_size_px), dst=out, interpolation=interpolation)
    return out


def _continues_run(previous: Tile, tile: Tile) -> bool:
    """Whether ``tile`` can share one region read with ``previous``: same level and rows of level
    pixels, starting right of it within its width (grid neighbours overlap by the margin)."""
    return (
        tile.level == previous.level
        and tile.read_y_px == previous.read_y_px
        and tile.read_h_px == previous.read_h_px
        and tile.read_w_px == previous.read_w_px
        and 0 < tile.read_x_px - previous.read_x_px <= previous.read_w_px
    )


def read_tiles(slide: Slide, tiles: Sequence[Tile], tile_size_px: int, out: np.ndarray) -> None:
    """Read ``tiles`` into ``out[:len(tiles)]`` (uint8 (N, T, T, 3)), as :func:`read_tile` would.

    Why runs: grid neighbours in a row overlap by twice the margin, and OpenSlide composes every
    region it is asked for from its cached JPEG tiles, so each ``read_region`` costs in
    proportion to its pixels plus a fixed setup. Where the level is read as is (no resampling,
    the usual case), a run of up to :data:`MAX_RUN_TILES` row neighbours is read as one region
    and cut into tiles: fewer pixels composed (the overlap once) and one call per run; measured
    on the 40x bench slide about 0.3 ms less per 256 px tile (1.35 vs 1.65 ms).
    """
    i, n = 0, len(tiles)
    while i < n:
        first = tiles[i]
        j = i + 1
        if first.read_w_px == tile_size_px and first.read_h_px == tile_size_px:
            while j < n and j - i < MAX_RUN_TILES and _continues_run(tiles[j - 1], tiles[j]):
                j += 1
        if j - i == 1:
            read_tile(slide, first, tile_size_px, out=out[i])
            i = j
            continue
        width_px = tiles[j - 1].read_x_px + first.read_w_px - first.read_x_px
        region = slide.read_level(first.level, first.read_x_px, first.read_y_px, width_px, first.read_h_px)
        for k in range(i, j):
            x = tiles[k].read_x_px - first.read_x_px
            out[k] = region[:, x : x + tile_size_px]
        i = j
