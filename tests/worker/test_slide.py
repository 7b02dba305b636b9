"""The slide reader: backends, MPP sources, level choice, vetting, reads outside the slide."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from fprotoseg.worker.errors import MissingMppError, SlideError, SlideTooLargeError, UnsupportedFormatError
from fprotoseg.worker.wsi.slide import open_slide
from tests.stubs import write_claimed_size_tiff, write_pyramid_tiff


def _rgb(h: int = 600, w: int = 800) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 240, np.uint8)
    img[100:400, 200:600] = rng.integers(60, 200, size=(300, 400, 3), dtype=np.uint8)
    return img


def test_aperio_mpp_from_vendor_metadata(shared_data):
    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        assert slide.reader == "openslide" and slide.vendor == "aperio"
        assert slide.mpp == pytest.approx(0.499)
        assert slide.mpp_source == "metadata:openslide.mpp-x"
        assert (slide.width_px, slide.height_px) == (2220, 2967)


def test_ome_tiff_goes_to_tiffslide_with_physical_size(shared_data):
    with open_slide(shared_data / "slides" / "OS-1-detail.ome.tif") as slide:
        assert slide.reader == "tiffslide"
        assert slide.mpp == pytest.approx(0.2271, abs=1e-4)
        region = slide.read_level(0, 0, 0, 64, 64)
        assert region.shape == (64, 64, 3) and region.dtype == np.uint8


def test_ndpi_pyramid_and_level_choice(shared_data):
    with open_slide(shared_data / "slides" / "test3-DAPI-2-387.ndpi") as slide:
        assert slide.vendor == "hamamatsu" and slide.level_count == 7
        # 0.228 µm/px at level 0: for a 1.0 µm/px model, level 2 (0.913 µm/px) is the coarsest
        # level still at least as fine; level 3 (1.83) would lose detail.
        assert slide.best_level_for_mpp(1.0) == 2
        assert slide.best_level_for_mpp(0.1) == 0


def test_missing_mpp_names_the_fix_and_override_wins(shared_data):
    path = shared_data / "slides" / "TCGA-CR-7395-01A-01-TS1.svs"
    with pytest.raises(MissingMppError, match="--mpp"):
        open_slide(path)
    with open_slide(path, mpp_override=0.5) as slide:
        assert slide.mpp == 0.5 and slide.mpp_source == "override"


@pytest.mark.parametrize(("unit", "px_per_unit", "expected_mpp"), [
    ("CENTIMETER", 1e4 / 0.25, 0.25),
    ("INCH", 25400 / 0.5, 0.5),
])
def test_mpp_from_tiff_resolution_tags(tmp_path, unit, px_per_unit, expected_mpp):
    path = tmp_path / "res.tiff"
    # A stripped (not tiled) TIFF: no OpenSlide driver, so tiffslide + our tag parsing.
    tifffile.imwrite(path, _rgb(), photometric="rgb", resolution=(px_per_unit, px_per_unit),
                     resolutionunit=unit, metadata=None)
    with open_slide(path) as slide:
        assert slide.mpp == pytest.approx(expected_mpp, rel=1e-6)


def test_generic_tiff_pyramid_and_reads_outside_are_glass(tmp_path):
    rgb = _rgb()
    path = write_pyramid_tiff(tmp_path / "p.tiff", rgb, 0.5, 3)
    with open_slide(path) as slide:
        assert slide.reader == "openslide" and slide.level_count == 3
        assert slide.level_downsamples[2] == pytest.approx(4.0, rel=0.01)
        # half outside the right/bottom edge: the outside part is white, the inside real
        region = slide.read_level(0, 700, 500, 200, 200)
        assert (region[100:, :] == 255).all() and (region[:, 100:] == 255).all()
        assert np.abs(region[:100, :100].astype(int) - rgb[500:600, 700:800]).mean() < 8
        thumb, mpp = slide.read_scaled(4.0)
        assert mpp == pytest.approx(4.0) and thumb.shape == (75, 100, 3)


def test_vetting_refuses_bombs_and_non_slides(tmp_path):
    bomb = write_claimed_size_tiff(tmp_path / "bomb.tiff", 200_000, 200_000)
    with pytest.raises(SlideTooLargeError, match="200000x200000"):
        open_slide(bomb)
    huge = write_claimed_size_tiff(tmp_path / "huge.tiff", 600_000, 1000)
    with pytest.raises(SlideTooLargeError, match="beyond any real slide"):
        open_slide(huge)
    text = tmp_path / "x.svs"
    text.write_text("hello")
    with pytest.raises(UnsupportedFormatError):
        open_slide(text)
    with pytest.raises(SlideError, match="not found"):
        open_slide(tmp_path / "missing.svs")
    with pytest.raises(SlideError, match="plausible"):
        open_slide(bomb, mpp_override=-1)


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs",
                                  "test3-DAPI-2-387.ndpi", "derived/CMU-1-Small-Region.pyramid.tiff"])
@pytest.mark.parametrize("percent", [30, 95, 99])
def test_truncated_slides_are_refused_before_decoding(tmp_path, shared_data, name, percent):
    """Regression: a cut-off upload once opened with tifffile log lines on stderr and failed late."""
    data = (shared_data / "slides" / name).read_bytes()
    path = tmp_path / "cut.svs"
    path.write_bytes(data[: len(data) * percent // 100])
    with pytest.raises(SlideError, match="truncated"):
        open_slide(path, mpp_override=0.5)


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "test3-DAPI-2-387.ndpi"])
def test_direct_openslide_reads_equal_the_public_read_region(shared_data, name):
    """Tiles decode through OpenSlide's C call into a reused buffer (no PIL image, no extra
    copies); the pixels are exactly those of openslide-python's public read_region."""
    import openslide

    from fprotoseg.worker.wsi.slide import _raw_openslide_reader, _to_rgb_on_white

    path = shared_data / "slides" / name
    public = openslide.OpenSlide(str(path))
    with open_slide(path, mpp_override=0.5) as slide:
        assert _raw_openslide_reader(slide._handle) is not None  # the pinned openslide-python has it
        assert slide._raw_read is not None  # resolved once at open, used by every read
        batch = np.zeros((3, 256, 256, 3), np.uint8)  # reads land in slots of a batch buffer
        level = slide.level_count - 1 if name.endswith(".ndpi") else 0
        lw, lh = slide.level_dimensions[level]
        corners = [(0, 0), (lw // 2 - 128, lh // 2 - 128), (max(0, lw - 300), max(0, lh - 300))]
        for i, (x, y) in enumerate(corners):
            got = slide.read_level(level, x, y, 256, 256, out=batch[i])
            ds = slide.level_downsamples[level]
            want = np.empty((256, 256, 3), np.uint8)
            rgba = np.asarray(public.read_region((round(x * ds), round(y * ds)), level, (256, 256)))
            _to_rgb_on_white(rgba, (256, 256), want)
            assert np.shares_memory(got, batch[i]) and np.array_equal(batch[i], want), (name, x, y)
            assert got.std() > 1  # real pixels, not a blank buffer
    public.close()


def test_transparent_pixels_are_composited_on_white_as_before(shared_data):
    """OpenSlide marks unscanned area transparent (premultiplied ARGB). The direct path's
    composite equals the public path's (un-premultiply, then over white) within rounding."""
    from fprotoseg.worker.wsi.slide import _premultiplied_bgra_on_white, _to_rgb_on_white

    with open_slide(shared_data / "slides" / "CMU-1-Small-Region.svs") as slide:
        rgb = slide.read_level(0, 900, 1200, 128, 128)
    alpha = np.tile(np.linspace(0, 255, 128).round().astype(np.uint8), (128, 1))
    premultiplied = (rgb.astype(np.float64) * alpha[:, :, None] / 255).round().astype(np.uint8)
    bgra = np.dstack([premultiplied[:, :, ::-1], alpha])  # the bytes of little-endian ARGB words
    rgba = np.dstack([rgb, alpha])  # what openslide-python hands out: straight alpha
    direct, public = np.empty_like(rgb), np.empty_like(rgb)
    _premultiplied_bgra_on_white(np.ascontiguousarray(bgra), direct)
    _to_rgb_on_white(rgba, (128, 128), public)
    assert np.abs(direct.astype(int) - public.astype(int)).max() <= 1
    assert (direct[:, 0] == 255).all() and np.array_equal(direct[:, -1], rgb[:, -1])
