"""Feed the network: read tiles into batch buffers, run the network, stitch the scores, overlapped.

Why this shape (the pipeline's own ceiling should be the slide reader, not its glue):
- One pool of worker threads (one per core by default) does all per-tile CPU work: decoding and
  resampling each tile straight into its row of a batch buffer, and stitching each tile's scores
  into the label map. OpenSlide, OpenCV and the stitcher's sampling release the GIL, so the pool
  scales with cores; a separate single stitch thread was the bottleneck once the network was free.
- Batches live in a small ring of slots (host buffers the segmenter hands out: pinned on CUDA),
  reused for the whole slide: no allocation per batch, and a bounded memory of
  ``prefetch_batches + 2`` batches whatever the slide.
- The network gets batch k+1 before we ask for batch k's scores (``submit`` on a streaming
  segmenter returns at once), so on a GPU the upload of one batch overlaps the compute of the
  previous one, and the only wait per batch is for scores the stitcher is about to use.
- A slot is refilled only after its stitching finished; cancellation is checked between batches.

On a CPU-only host the network itself uses every core, and the worker threads take turns with it
instead of running beside it: no work item starts while the network runs, and the network starts
only once the items in flight have finished. Beside it, a reader thread that takes a core from one
of the network's OpenMP threads stalls the others at their next barrier too, so each
millisecond of reading cost the network about two (measured: the inference stage at 0.87-0.92
of model-only with the readers running beside it at a lower priority). Taking turns, reading
and stitching cost only their own time, spread over every core.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fprotoseg.model.segmenter import PendingScores, ReadyScores, Segmenter, StreamingSegmenter
from fprotoseg.worker.errors import JobCancelledError, SegmenterOutputError
from fprotoseg.worker.wsi.slide import Slide
from fprotoseg.worker.wsi.stitch import LabelMapStitcher
from fprotoseg.worker.wsi.tiling import Tile, read_tiles

ProgressCallback = Callable[[str, int, int], None]
# Work items per thread per batch: small enough to balance the threads, large enough that
# scheduling (a future per item) stays a small fraction of the work.
ITEMS_PER_THREAD = 2


@dataclass
class FeedTimings:
    """Seconds spent, as the batch loop saw them (waits) and summed over worker threads (work)."""

    model_s: float = 0.0  # submitting batches and waiting for their scores
    wait_for_reads_s: float = 0.0  # batch loop waiting for a batch's tiles
    wait_for_stitch_s: float = 0.0  # batch loop waiting for a slot to be stitched and freed
    read_s: float = 0.0  # worker-thread seconds reading tiles (summed over threads)
    stitch_s: float = 0.0  # worker-thread seconds stitching (summed over threads)
    feed_s: float = 0.0  # wall seconds from the first read to the last tile stitched
    feed_cpu_s: float = 0.0  # CPU seconds of this process over the same span (all threads)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add_work(self, name: str, seconds: float) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + seconds)

    def as_dict(self) -> dict[str, float]:
        return {
            "model_s": self.model_s,
            "wait_for_reads_s": self.wait_for_reads_s,
            "wait_for_stitch_s": self.wait_for_stitch_s,
            "read_s": self.read_s,
            "stitch_s": self.stitch_s,
            "feed_s": self.feed_s,
            "feed_cpu_s": self.feed_cpu_s,
        }


@dataclass
class _Slot:
    """One reusable batch: the tiles going in, the scores coming out, and what is in flight."""

    tiles_buffer: np.ndarray  # (B, T, T, 3) uint8
    scores_buffer: np.ndarray | None  # (B, C, h, w) float32 for a streaming segmenter
    tiles: Sequence[Tile] = ()
    batch: int = -1  # the batch whose reads were last started into this slot
    reads: list[Future[None]] = field(default_factory=list)
    stitches: list[Future[None]] = field(default_factory=list)
    unstitched: int = 0  # stitch items of this slot still running


def network_uses_cpu(segmenter: Segmenter) -> bool:
    """Whether the network competes with the worker threads for the CPU (then they take turns)."""
    return str(segmenter.device) == "cpu"


class _TurnTaking:
    """Work items and a CPU network take turns on the cores (see the module docstring).

    Off (``enabled=False``, a GPU or a null network) every call returns at once.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._cv = threading.Condition()
        self._network_running = False
        self._items_running = 0

    @contextlib.contextmanager
    def item(self) -> Iterator[None]:
        """Around one work item: waits while the network runs."""
        if not self.enabled:
            yield
            return
        with self._cv:
            self._cv.wait_for(lambda: not self._network_running)
            self._items_running += 1
        try:
            yield
        finally:
            with self._cv:
                self._items_running -= 1
                self._cv.notify_all()

    @contextlib.contextmanager
    def network(self) -> Iterator[None]:
        """Around one forward pass: holds new items back and waits for those in flight.

        The flag is raised inside the ``try``: an exception delivered to the batch loop while it
        waits (a signal handler's, a cancellation) must not leave every worker thread held back,
        or the pool's shutdown would wait for them forever.
        """
        if not self.enabled:
            yield
            return
        try:
            with self._cv:
                self._network_running = True
                self._cv.wait_for(lambda: self._items_running == 0)
            yield
        finally:
            with self._cv:
                self._network_running = False
                self._cv.notify_all()


def _chunks(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` items in up to ``parts`` contiguous (start, stop) ranges of near-equal size."""
    parts = max(1, min(parts, count))
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


class Feeder:
    """Runs one slide's tiles through the network into the stitcher (see the module docstring)."""

    _pool: ThreadPoolExecutor  # the worker threads of one run()

    def __init__(
        self,
        slide: Slide,
        tiles: Sequence[Tile],
        tile_size_px: int,
        segmenter: Segmenter,
        stitcher: LabelMapStitcher,
        *,
        batch_size: int,
        threads: int,
        prefetch_batches: int,
        progress: ProgressCallback,
        should_cancel: Callable[[], bool],
        pixel_transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.slide = slide
        # per-slide pixel map applied to every tile as it is read (the model's stain normalisation)
        self.pixel_transform = pixel_transform
        self.tiles = tiles
        self.tile_size_px = tile_size_px
        self.segmenter = segmenter
        self.stitcher = stitcher
        self.batch_size = batch_size
        self.threads = threads
        self.prefetch_batches = prefetch_batches
        self.progress = progress
        self.should_cancel = should_cancel
        self.timings = FeedTimings()
        self.streaming = isinstance(segmenter, StreamingSegmenter)
        self.n_classes = len(segmenter.classes)
        self.scores_px = tile_size_px // int(segmenter.output_stride)
        self._cv = threading.Condition()  # slot hand-over between the batch loop and the workers
        self._error: BaseException | None = None  # the first worker error, raised in the loop
        self._turns = _TurnTaking(enabled=network_uses_cpu(segmenter))

    # ------------------------------------------------------------------------------- the work
    def _read_into(self, slot: _Slot, start: int, stop: int) -> None:
        with self._turns.item():
            t0 = time.perf_counter()
            pixels = slot.tiles_buffer[start:stop]
            read_tiles(self.slide, slot.tiles[start:stop], self.tile_size_px, pixels)
            if self.pixel_transform is not None:
                pixels[...] = self.pixel_transform(pixels)
            self.timings.add_work("read_s", time.perf_counter() - t0)

    def _stitch(self, slot: _Slot, scores: np.ndarray, start: int, stop: int) -> None:
        with self._turns.item():
            t0 = time.perf_counter()
            # The slot still holds the tiles' pixels: it is refilled only after all of it is stitched.
            self.stitcher.add_batch(slot.tiles[start:stop], scores[start:stop], slot.tiles_buffer[start:stop])
            self.timings.add_work("stitch_s", time.perf_counter() - t0)

    def _check_scores(self, scores: np.ndarray, n: int) -> None:
        hw = self.scores_px
        if scores.shape != (n, self.n_classes, hw, hw):
            raise SegmenterOutputError(
                f"segmenter returned scores of shape {scores.shape}, "
                f"expected ({n}, {self.n_classes}, {hw}, {hw})"
            )

    # ---------------------------------------------------------------------------- the loop
    def _new_slot(self) -> _Slot:
        t, b, h = self.tile_size_px, self.batch_size, self.scores_px
        if self.streaming:
            seg: StreamingSegmenter = self.segmenter  # type: ignore[assignment]
            return _Slot(
                tiles_buffer=seg.host_buffer((b, t, t, 3), np.uint8),
                scores_buffer=seg.host_buffer((b, self.n_classes, h, h), np.float32),
            )
        return _Slot(tiles_buffer=np.empty((b, t, t, 3), dtype=np.uint8), scores_buffer=None)

    def _start_reads(self, slot: _Slot, batch_index: int) -> None:
        """Queue the reads of one batch into ``slot`` (from the batch loop or a stitch worker)."""
        start = batch_index * self.batch_size
        slot.tiles = self.tiles[start : start + self.batch_size]
        parts = self.threads * ITEMS_PER_THREAD
        reads = [self._pool.submit(self._read_into, slot, a, b) for a, b in _chunks(len(slot.tiles), parts)]
        with self._cv:
            slot.reads = reads
            slot.batch = batch_index
            self._cv.notify_all()

    def _wait_for_tiles(self, slot: _Slot, batch_index: int) -> None:
        """Block until batch ``batch_index`` is decoded into ``slot``; re-raise a worker's error."""
        t0 = time.perf_counter()
        with self._cv:
            self._cv.wait_for(lambda: slot.batch == batch_index or self._error is not None)
        if self._error is not None:
            raise self._error
        for fut in slot.reads:
            fut.result()
        self.timings.wait_for_reads_s += time.perf_counter() - t0

    def _submit(self, slot: _Slot) -> PendingScores:
        n = len(slot.tiles)
        t0 = time.perf_counter()
        batch = slot.tiles_buffer[:n]
        with self._turns.network():  # a CPU network computes here; a GPU one only queues
            if self.streaming and slot.scores_buffer is not None:
                pending = self.segmenter.submit(batch, slot.scores_buffer)  # type: ignore[attr-defined]
            else:
                pending = ReadyScores(self.segmenter.predict(batch))
        self.timings.model_s += time.perf_counter() - t0
        return pending

    def _stitch_item(
        self, slot: _Slot, scores: np.ndarray, start: int, stop: int, refill: int | None
    ) -> None:
        """Stitch tiles ``start:stop`` of a slot; the last item to finish refills the slot."""
        try:
            self._stitch(slot, scores, start, stop)
        except BaseException as exc:
            with self._cv:
                self._error = self._error or exc
                self._cv.notify_all()
            raise
        with self._cv:
            slot.unstitched -= 1
            last = slot.unstitched == 0
        if last and refill is not None:
            self._start_reads(slot, refill)

    def _start_stitch(self, slot: _Slot, pending: PendingScores, refill: int | None) -> None:
        """Take a batch's scores (waiting for them: the one sync per batch) and queue stitching."""
        t0 = time.perf_counter()
        scores = pending.result()
        self.timings.model_s += time.perf_counter() - t0
        n = len(slot.tiles)
        self._check_scores(scores, n)
        items = _chunks(n, self.threads)  # one per thread: the stitcher works a batch at a time
        slot.unstitched = len(items)
        slot.stitches = [self._pool.submit(self._stitch_item, slot, scores, a, b, refill) for a, b in items]

    def run(self) -> FeedTimings:
        """Feed every tile; returns the timings. Raises JobCancelledError between batches.

        At iteration b: wait for batch b's tiles, submit it, then take batch b-1's scores and
        queue their stitching. The batch loop never waits for stitching: the worker that
        finishes a slot's stitching queues the reads of the next batch for that slot. Slots:
        ``prefetch_batches`` reading, one in the network, one being stitched.
        """
        total = len(self.tiles)
        n_batches = math.ceil(total / self.batch_size)
        self.progress("inference", 0, total)
        if n_batches == 0:
            return self.timings
        started, started_cpu = time.perf_counter(), time.process_time()
        n_slots = min(n_batches, self.prefetch_batches + 2)
        slots = [self._new_slot() for _ in range(n_slots)]
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fprotoseg-feed")
        done = 0  # tiles whose scores went to stitching
        inferred = 0  # tiles the network has computed: what progress counts
        pending: PendingScores | None = None
        try:
            for b in range(n_slots):
                self._start_reads(slots[b], b)
            for b in range(n_batches + 1):
                slot = slots[b % n_slots]
                previous = pending
                if b < n_batches:
                    self._wait_for_tiles(slot, b)
                    if self.should_cancel():
                        raise JobCancelledError("the job was cancelled")
                    pending = self._submit(slot)
                    if isinstance(pending, ReadyScores):  # computed in _submit (a CPU network)
                        # counted now, not once the next batch is computed too: a 2-batch job
                        # would otherwise show no progress for its whole inference
                        inferred += len(slot.tiles)
                        self.progress("inference", inferred, total)
                if b >= 1 and previous is not None:  # batch b is queued; b-1's scores go to stitching
                    prev = slots[(b - 1) % n_slots]
                    refill = b - 1 + n_slots
                    done += len(prev.tiles)  # before the stitchers may refill the slot
                    self._start_stitch(prev, previous, refill if refill < n_batches else None)
                    if done > inferred:  # a queued (GPU) batch: counted once its scores are taken
                        inferred = done
                        self.progress("inference", inferred, total)
            t0 = time.perf_counter()
            for slot in slots:
                for fut in slot.stitches:
                    fut.result()
            self.timings.wait_for_stitch_s += time.perf_counter() - t0
        except BaseException:
            with self._cv:
                self._error = self._error or JobCancelledError("stopped")
            for slot in slots:
                for fut in (*slot.reads, *slot.stitches):
                    fut.cancel()
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.timings.feed_s = time.perf_counter() - started
        self.timings.feed_cpu_s = time.process_time() - started_cpu
        return self.timings
