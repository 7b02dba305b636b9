"""The feed (reader/stitcher threads, batch slots, the streaming seam) on real slides.

What must hold whatever the thread count, batch size or network: the same label map, every
tile inferred once, errors and cancellation surfacing in the batch loop, tiles decoded straight
into the batch equal to tiles read on their own, and the pyramid level nearest the model's
µm/px read on a 40x-style pyramid (0.25 µm/px with 4x and 16x levels) written by the bench's
own generator from real tissue. No timing is asserted here; speed is measured in bench/.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import tifffile

from fprotoseg.worker.errors import JobCancelledError, SegmenterOutputError
from fprotoseg.worker.wsi import cpus, tiling
from fprotoseg.worker.wsi.pipeline import PipelineOptions, _tissue_stage, run
from fprotoseg.worker.wsi.slide import open_slide
from fprotoseg.worker.wsi.stitch import LabelMapStitcher, sample_bilinear
from fprotoseg.worker.wsi.tiling import plan_tiles, read_tile, read_tiles
from tests.stubs import ChannelStubSegmenter, render_known_slide_rgb, write_pyramid_tiff

REPO = Path(__file__).resolve().parents[2]


def _bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def slide_40x(tmp_path_factory, shared_data):
    """A 6000 x 5000 px slide at 0.25 µm/px with 4x and 16x levels, from real BCSS-WSSS tissue."""
    if not (shared_data / "bcss_wsss" / "training").is_dir():
        pytest.skip("needs ../shared/data/bcss_wsss/training")
    gen = _bench_module("make_40x_slide")
    return gen.write_slide(tmp_path_factory.mktemp("40x") / "slide-40x.tiff", 6000, 5000)


def _label_map(result) -> np.ndarray:
    return tifffile.imread(result.files["mask"])


def test_thread_counts_and_batch_sizes_give_the_same_label_map(tmp_path, known_slide):
    maps = []
    for threads, batch in ((1, 32), (3, 3), (2, 5)):
        stub = ChannelStubSegmenter()
        options = PipelineOptions(reader_threads=threads, batch_size=batch, prefetch_batches=1)
        result = run(known_slide.path, tmp_path / f"t{threads}b{batch}", stub, options=options)
        assert sum(stub.calls) == result.tiles_inferred  # every tile once, in batches of <= batch
        assert max(stub.calls) <= batch
        assert result.provenance["options"]["reader_threads"] == threads
        maps.append(_label_map(result))
    assert maps[0].any()
    for other in maps[1:]:
        np.testing.assert_array_equal(other, maps[0])


def test_tiles_decoded_into_batch_slots_equal_plain_reads(known_slide):
    with open_slide(known_slide.path) as slide:
        tissue, _ = _tissue_stage(slide, PipelineOptions())
        for model_mpp, tile_px in ((1.0, 224), (1.5, 160)):  # level read as is, and resampled
            grid = plan_tiles(slide, tissue, model_mpp=model_mpp, tile_size_px=tile_px,
                              output_stride=8, output_mpp=2.0)
            batch = np.zeros((4, tile_px, tile_px, 3), dtype=np.uint8)
            # the first tiles of the grid include ones reaching past the slide's top/left edge
            chosen = [grid.tiles[0], grid.tiles[1], grid.tiles[len(grid.tiles) // 2], grid.tiles[-1]]
            for i, tile in enumerate(chosen):
                read_tile(slide, tile, tile_px, out=batch[i])
                np.testing.assert_array_equal(batch[i], read_tile(slide, tile, tile_px))
            # runs of row neighbours read as one region: the same pixels, tile by tile
            runs = np.zeros((len(grid.tiles), tile_px, tile_px, 3), dtype=np.uint8)
            read_tiles(slide, grid.tiles, tile_px, runs)
            neighbours = sum(map(tiling._continues_run, grid.tiles, grid.tiles[1:]))
            assert neighbours > len(grid.tiles) / 2 if model_mpp == 1.0 else True  # runs were read
            for i, tile in enumerate(grid.tiles):
                np.testing.assert_array_equal(runs[i], read_tile(slide, tile, tile_px))
            edge = min(grid.tiles, key=lambda t: (t.read_y_px, t.read_x_px))
            if edge.read_x_px < 0 or edge.read_y_px < 0:  # outside the slide is white glass
                read_tile(slide, edge, tile_px, out=batch[0])
                assert (batch[0][0, 0] == 255).all()


def test_stitcher_equals_the_numpy_bilinear_reference(known_slide):
    """OpenCV sampling (GIL released) gives the labels of the exact numpy sampling + argmax."""
    with open_slide(known_slide.path) as slide:
        tissue, _ = _tissue_stage(slide, PipelineOptions())
        grid = plan_tiles(slide, tissue, model_mpp=1.0, tile_size_px=224, output_stride=8, output_mpp=2.0)
    stitcher = LabelMapStitcher(grid.output_shape, 2.0, tissue)
    rng = np.random.default_rng(0)
    agree = total = 0
    for tile in grid.tiles:
        scores = rng.random((3, 28, 28), dtype=np.float32)
        stitcher.add(tile, scores)
        o, um_y, um_x = 2.0, tile.span_y_um / 28, tile.span_x_um / 28
        ys = ((np.arange(tile.own_y0, tile.own_y1) + 0.5) * o - tile.origin_y_um) / um_y - 0.5
        xs = ((np.arange(tile.own_x0, tile.own_x1) + 0.5) * o - tile.origin_x_um) / um_x - 0.5
        expected = np.argmax(sample_bilinear(scores, ys, xs), axis=0) + 1
        got = stitcher.label_map[tile.own_y0 : tile.own_y1, tile.own_x0 : tile.own_x1]
        inside = got > 0  # glass comes from the tissue mask, the same in both
        agree += int((got[inside] == expected[inside]).sum())
        total += int(inside.sum())
    assert total > 10_000
    assert agree / total > 0.9999  # only float rounding at near-ties may differ


def test_a_batch_stitches_as_its_tiles_one_by_one(tmp_path, shared_data, monkeypatch):
    """Batched sampling (one remap per class over the stacked score maps) labels every tile as
    placing it alone would: whatever its place in the batch, its owned size (the grid's last
    row and column own less), or a batch split to fit OpenCV's int16 maps."""
    from fprotoseg.worker.wsi import stitch

    rgb, _ = render_known_slide_rgb(shared_data / "patches", 1.0)
    # cut through the tissue at odd sizes: the last row and column of tiles own smaller windows
    cut = np.ascontiguousarray(rgb[: rgb.shape[0] // 2 + 37, : rgb.shape[1] // 2 + 53])
    odd = write_pyramid_tiff(tmp_path / "odd.tiff", cut, 1.0, 2)
    with open_slide(odd) as slide:
        tissue, _ = _tissue_stage(slide, PipelineOptions())
        for model_mpp, tile_px, stride in ((1.0, 224, 8), (1.5, 160, 4)):  # exact and odd ratios
            grid = plan_tiles(slide, tissue, model_mpp=model_mpp, tile_size_px=tile_px,
                              output_stride=stride, output_mpp=2.0)
            tiles = grid.tiles
            sizes = {(t.own_y1 - t.own_y0, t.own_x1 - t.own_x0) for t in tiles}
            assert len(sizes) > 1  # windows of different sizes in the same batches
            side = tile_px // stride
            scores = np.random.default_rng(1).random((len(tiles), 3, side, side), dtype=np.float32)
            pixels = np.stack([read_tile(slide, t, tile_px) for t in tiles])
            alone = LabelMapStitcher(grid.output_shape, 2.0, tissue)
            for i, tile in enumerate(tiles):
                alone.add(tile, scores[i], pixels[i])
            batched = LabelMapStitcher(grid.output_shape, 2.0, tissue)
            monkeypatch.setattr(stitch, "MAX_STACKED_ROWS", 7 * side)  # batches of 32 split 7+7+7+7+4
            for a in range(0, len(tiles), 32):
                batched.add_batch(tiles[a : a + 32], scores[a : a + 32], pixels[a : a + 32])
            monkeypatch.undo()
            assert alone.label_map.any()
            np.testing.assert_array_equal(batched.label_map, alone.label_map)


def test_tissue_edges_are_traced_at_the_output_resolution(tmp_path, shared_data):
    """The tissue mask (4 µm/px, opened by 8 µm) shaves a few µm off every tissue edge and rounds
    every corner; with the tiles' own pixels the stitcher puts those edges back where the tissue
    ends, and the glass beside them stays glass."""

    from tests.stubs import GLASS_RGB, load_textures, mosaic

    # µm at 1 µm/px; every edge on the 2 µm output grid and half-way across a 4 µm mask pixel
    h, w = 1000, 1400
    rects = [(202, 150, 702, 802), (806, 306, 1298, 610)]
    rgb = np.empty((h, w, 3), np.uint8)
    rgb[:] = GLASS_RGB
    texture = mosaic(load_textures(shared_data / "patches"), h, w, 1.0, seed=3)
    truth = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in rects:
        rgb[y0:y1, x0:x1] = texture[y0:y1, x0:x1]
        truth[y0:y1, x0:x1] = True
    path = write_pyramid_tiff(tmp_path / "edges.tiff", rgb, 1.0, 3)
    with open_slide(path) as slide:
        tissue, _ = _tissue_stage(slide, PipelineOptions())
        grid = plan_tiles(slide, tissue, model_mpp=1.0, tile_size_px=224, output_stride=8, output_mpp=2.0)
        coarse = LabelMapStitcher(grid.output_shape, 2.0, tissue)
        traced = LabelMapStitcher(grid.output_shape, 2.0, tissue)
        scores = np.ones((3, 28, 28), np.float32)
        for tile in grid.tiles:
            pixels = read_tile(slide, tile, 224)
            coarse.add(tile, scores)
            traced.add(tile, scores, pixels)
    truth_2um = truth[::2, ::2][: grid.output_shape[0], : grid.output_shape[1]]
    missed = {name: int((truth_2um & (s.label_map == 0)).sum()) for name, s in
              (("coarse", coarse), ("traced", traced))}
    spilled = {name: int((~truth_2um & (s.label_map > 0)).sum()) for name, s in
               (("coarse", coarse), ("traced", traced))}
    perimeter_px = sum((x1 - x0 + y1 - y0) for x0, y0, x1, y1 in rects)  # 2 * sides / 2 µm per px
    # measured: the coarse mask misses 1,730 tissue pixels (a pixel along most edges), traced 153
    assert missed["coarse"] > 0.5 * perimeter_px
    assert missed["traced"] < 0.15 * missed["coarse"]
    assert spilled["traced"] <= spilled["coarse"] + 0.02 * perimeter_px  # glass stays glass


def test_40x_pyramid_reads_the_level_nearest_the_model(tmp_path, slide_40x):
    with open_slide(slide_40x) as slide:
        assert slide.mpp == pytest.approx(0.25)
        assert [round(d) for d in slide.level_downsamples] == [1, 4, 16]
    for model_mpp, level in ((4.0, 2), (0.5, 0), (2.0, 1), (1.0, 1)):
        stub = ChannelStubSegmenter(mpp=model_mpp)
        result = run(slide_40x, tmp_path / f"m{model_mpp}", stub, options=PipelineOptions(batch_size=16))
        read = result.provenance["read"]
        assert read["level"] == level, model_mpp
        assert read["level_mpp"] == pytest.approx(0.25 * 4**level, rel=1e-3)
        grid_total = result.provenance["tiles"]["grid_total"]
        assert 0 < result.tiles_inferred <= grid_total
        if model_mpp == 1.0:
            assert result.tiles_inferred < 0.85 * grid_total  # glass is skipped
    # about half of the generated slide is glass, and the pipeline finds that too
    area_um2 = 6000 * 5000 * 0.25**2
    assert 0.35 < result.stats["tissue_area_um2"] / area_um2 < 0.7


def test_streaming_seam_on_cpu_matches_predict(tiny_checkpoint):
    from fprotoseg import model

    seg = model.load_segmenter(tiny_checkpoint, device="cpu", precision="fp32")
    t = seg.tile_size_px
    h = t // seg.output_stride
    tiles_buffer = seg.host_buffer((6, t, t, 3), np.uint8)
    scores_buffer = seg.host_buffer((6, len(seg.classes), h, h), np.float32)
    tiles_buffer[:] = np.random.default_rng(1).integers(0, 256, tiles_buffer.shape, dtype=np.uint8)
    # a view of a host buffer is used in place, not copied
    view = seg._host_tensor(tiles_buffer[:5])
    assert view.data_ptr() == tiles_buffer.__array_interface__["data"][0]
    scores = seg.submit(tiles_buffer[:5], scores_buffer).result()
    assert scores.shape == (5, len(seg.classes), h, h)
    assert np.shares_memory(scores, scores_buffer)
    np.testing.assert_allclose(scores, seg.predict(tiles_buffer[:5]), atol=1e-5)
    assert seg.suggest_batch_size() == 32  # CPU: 32 tiles up to 256 px


def test_the_cpu_batch_is_a_pixel_budget() -> None:
    """Activations grow with a tile's area: 512 px tiles go 8 to a CPU batch (same speed as 32, a
    third of the memory in bench/pipeline.py), the packaged default's 1024 px tiles 2; up to 256 px, 32."""
    from fprotoseg import model
    from fprotoseg.model.checkpoint import DEFAULT_CHECKPOINT
    from fprotoseg.model.segmenter import cpu_batch_size

    assert [cpu_batch_size(px) for px in (128, 256, 512, 1024, 4096)] == [32, 32, 8, 2, 1]
    seg = model.load_segmenter(DEFAULT_CHECKPOINT, device="cpu", precision="fp32")
    assert seg.tile_size_px == 1024 and seg.suggest_batch_size() == 2


def test_packaged_style_network_runs_through_the_streaming_seam(tmp_path, known_slide, tiny_checkpoint):
    from fprotoseg import model

    seg = model.load_segmenter(tiny_checkpoint, device="cpu", precision="fp32")
    result = run(known_slide.path, tmp_path / "out", seg, options=PipelineOptions(reader_threads=2))
    assert result.provenance["options"]["batch_size"] == 32  # chosen by the segmenter (None given)
    assert result.stats["tissue_area_um2"] > 0


def test_a_cpu_network_and_the_worker_threads_take_turns(tmp_path, known_slide, tiny_checkpoint, monkeypatch):
    """A network on the CPU never runs beside a tile read or a stitch (each would stall its
    OpenMP threads at their next barrier); a network elsewhere (GPU, null) runs beside them."""
    import threading
    import time

    from fprotoseg import model
    from fprotoseg.worker.wsi import feed

    intervals: dict[str, list[tuple[float, float]]] = {"network": [], "work": []}
    lock = threading.Lock()

    def timed(kind, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    intervals[kind].append((t0, time.perf_counter()))
        return wrapper

    monkeypatch.setattr(feed, "read_tiles", timed("work", feed.read_tiles))
    monkeypatch.setattr(LabelMapStitcher, "add_batch", timed("work", LabelMapStitcher.add_batch))

    def overlaps() -> int:
        return sum(a0 < b1 and b0 < a1 for a0, a1 in intervals["network"] for b0, b1 in intervals["work"])

    seg = model.load_segmenter(tiny_checkpoint, device="cpu", precision="fp32")
    seg.submit = timed("network", seg.submit)  # the CPU network computes inside submit
    options = PipelineOptions(reader_threads=2, batch_size=4, prefetch_batches=2)
    result = run(known_slide.path, tmp_path / "cpu", seg, options=options)
    assert len(intervals["network"]) == -(-result.tiles_inferred // 4) >= 5
    assert len(intervals["work"]) >= 2 * len(intervals["network"])  # reads and stitches of every batch
    assert overlaps() == 0

    for kind in intervals:
        intervals[kind].clear()
    stub = ChannelStubSegmenter(device="null")

    def slow_predict(tiles: np.ndarray) -> np.ndarray:
        time.sleep(0.02)  # a device that takes its time: the threads read the next batches meanwhile
        return ChannelStubSegmenter.predict(stub, tiles)

    stub.predict = timed("network", slow_predict)  # type: ignore[method-assign]
    run(known_slide.path, tmp_path / "null", stub, options=options)
    assert overlaps() > 0


def test_a_signal_while_the_cpu_network_waits_does_not_hold_the_workers_back():
    """The batch loop waits for items in flight before a CPU forward pass. An exception delivered
    there (a real SIGALRM whose handler raises, as a terminating worker's would) must leave the
    worker threads free to run: otherwise the pool's shutdown would wait for them forever."""
    import signal
    import threading

    from fprotoseg.worker.wsi.feed import _TurnTaking

    turns = _TurnTaking(enabled=True)
    inside, release = threading.Event(), threading.Event()

    def long_item() -> None:
        with turns.item():
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=long_item)
    holder.start()
    assert inside.wait(5)

    def interrupt(signum: int, frame: object) -> None:
        raise TimeoutError("signal while the network waited for an item")

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(TimeoutError), turns.network():
            pytest.fail("the network ran beside a work item")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    release.set()
    holder.join(5)
    started = threading.Event()

    def next_item() -> None:
        with turns.item():
            started.set()

    threading.Thread(target=next_item, daemon=True).start()
    assert started.wait(5)


def test_cancellation_and_wrong_scores_surface_in_the_batch_loop(tmp_path, known_slide):
    stub = ChannelStubSegmenter()
    with pytest.raises(JobCancelledError):
        run(known_slide.path, tmp_path / "c", stub, options=PipelineOptions(batch_size=2, reader_threads=3),
            should_cancel=lambda: len(stub.calls) >= 3)
    assert len(stub.calls) == 3

    class WrongShape(ChannelStubSegmenter):
        def predict(self, tiles_nhwc_uint8: np.ndarray) -> np.ndarray:
            return super().predict(tiles_nhwc_uint8)[:, :, :-1]

    with pytest.raises(SegmenterOutputError, match="shape"):
        run(known_slide.path, tmp_path / "w", WrongShape(), options=PipelineOptions(batch_size=4))


def test_default_threads_follow_the_cores_and_a_cgroup_quota(tmp_path, monkeypatch):
    assert cpus.available_cpus() <= len(os.sched_getaffinity(0))
    assert PipelineOptions().reader_threads == cpus.default_pipeline_threads() >= 1
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # docker --cpus 1.5
    monkeypatch.setattr(cpus, "CGROUP_V2_CPU_MAX", quota)
    assert cpus.available_cpus() == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert cpus.available_cpus() == len(os.sched_getaffinity(0))


def test_the_setting_defaults_to_the_cores(monkeypatch):
    from fprotoseg.worker.service.settings import load_settings

    assert load_settings().pipeline_threads == cpus.default_pipeline_threads()
    monkeypatch.setenv("FPROTOSEG_PIPELINE_THREADS", "5")
    assert load_settings().pipeline_threads == 5
