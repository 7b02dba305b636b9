"""The training data pipeline: weakly labelled crops through ``torch.utils.data``.

- :class:`WeakCropDataset` decodes images lazily (in the worker that needs them, with a small
  per-process cache), cuts a crop with its image-level label only (:func:`draw_weak_crop`), and
  augments it in the worker: rot90/flip, RGB stain jitter, HED jitter (:mod:`fprotoseg.model.training.stain`).
- Each crop is a pure function of (seed, epoch, global sample index, crop size): its random
  stream is seeded by that key, so the crops do not depend on the number of workers or ranks,
  and a run resumed at step s of an epoch draws exactly the crops an uninterrupted run draws.
- :class:`WeakBatchSampler` hands each rank its share of every global batch (DistributedSampler-
  like, deterministic per seed and epoch; one rank = the whole batch) and can start mid-epoch.
- :func:`make_loader` adds worker processes, persistent workers and pinned memory (CUDA only).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from fprotoseg.model.config_schema import TrainSection
from fprotoseg.model.training.datasets import DatasetError, WeakImage, WeakImageRef, area_cdf, draw_weak_crop
from fprotoseg.model.training.stain import hed_jitter, stain_jitter

Key = tuple[int, int, int]  # (epoch, global sample index in the epoch, crop px)


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, *key])


def flip_rotate(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """rot90 by a random multiple, then a horizontal flip with p = 0.5, image by image."""
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        img = np.rot90(img, int(rng.integers(4)))
        out[i] = img[:, ::-1] if rng.random() < 0.5 else img
    return out


@dataclass(frozen=True)
class Augment:
    """What each crop goes through (``train.colour_jitter``, ``saturation_jitter``, ``hed_jitter``)."""

    colour: float
    saturation: float
    hed: float

    @classmethod
    def from_config(cls, train: TrainSection) -> Augment:
        return cls(train.colour_jitter, train.saturation_jitter, train.hed_jitter)

    def __call__(self, crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(geometric, augmented): the crop flipped/rotated, and that crop with its stain jittered
        (pixel for pixel the same tissue: stage 2's clean teacher sees the first)."""
        geometric = flip_rotate(crop[None], rng)
        tinted = stain_jitter(geometric, rng, self.colour, self.saturation)
        return geometric[0], hed_jitter(tinted, rng, self.hed)[0]


class WeakCropDataset(Dataset[dict[str, Any]]):
    """Map-style dataset indexed by :data:`Key`; an item is ``x`` (uint8 HWC crop, augmented),
    ``label`` (image-level, float; -1 = unknown), ``load_s`` (seconds this process spent on it)
    and, with ``clean``, ``clean`` (the crop before the stain jitter)."""

    def __init__(
        self,
        images: Sequence[WeakImageRef | WeakImage],
        num_classes: int,
        min_fraction: float,
        *,
        seed: int,
        area_crop_px: int,
        augment: Augment,
        glass_prob: float = 0.0,
        clean: bool = False,
        cache_bytes: int = 256 << 20,
    ) -> None:
        if not images:
            raise DatasetError("no training images")
        self.images = list(images)
        self.num_classes = num_classes
        self.min_fraction = min_fraction
        self.seed = int(seed)
        self.augment = augment
        self.glass_prob = glass_prob
        self.clean = clean
        self.shapes = [im.shape for im in self.images]
        self.cdf = area_cdf(self.shapes, area_crop_px)
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, WeakImage] = OrderedDict()
        self._cached = 0

    def __len__(self) -> int:
        return len(self.images)

    def image(self, i: int) -> WeakImage:
        """Image i decoded (LRU cache of ``cache_bytes`` per process; each worker has its own)."""
        src = self.images[i]
        if isinstance(src, WeakImage):
            return src
        hit = self._cache.get(i)
        if hit is not None:
            self._cache.move_to_end(i)
            return hit
        im = src.load()
        size = im.rgb.nbytes + (im._mask.nbytes if im._mask is not None else 0)
        if size <= self.cache_bytes:
            self._cache[i] = im
            self._cached += size
            while self._cached > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached -= old.rgb.nbytes + (old._mask.nbytes if old._mask is not None else 0)
        return im

    def __getitem__(self, key: Key) -> dict[str, Any]:
        t = time.perf_counter()
        epoch, g, crop_px = key
        rng = _rng(self.seed, epoch, 0, g)
        crop, label = draw_weak_crop(
            rng, self.shapes, self.cdf, self.image, crop_px, self.num_classes, self.min_fraction,
            self.glass_prob,
        )
        geometric, x = self.augment(crop, rng)
        item: dict[str, Any] = {
            "x": torch.from_numpy(np.ascontiguousarray(x)),
            "label": torch.from_numpy(np.asarray(label, np.float32)),
        }
        if self.clean:
            item["clean"] = torch.from_numpy(np.ascontiguousarray(geometric))
        item["load_s"] = time.perf_counter() - t
        return item


class WeakBatchSampler(Sampler[list[Key]]):
    """This rank's share of each global batch of an epoch, as dataset keys.

    Step s of epoch e holds the global samples ``s * batch_size ... (s + 1) * batch_size - 1``;
    rank r of w takes the r-th contiguous slice of ``batch_size / w``. With several crop sizes the
    step draws its size from (seed, epoch, step), the same on every rank. :meth:`set_epoch` sets the
    epoch and the first step (a resumed run starts mid-epoch).
    """

    def __init__(
        self,
        batch_size: int,
        steps: int,
        crop_sizes: Sequence[int],
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise DatasetError(
                f"train.batch_size {batch_size} (the global batch) must be divisible by the "
                f"{world_size} processes"
            )
        self.batch_size, self.steps = batch_size, steps
        self.local = batch_size // world_size
        self.crop_sizes = [int(c) for c in crop_sizes]
        self.seed, self.rank = int(seed), rank
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start_step)

    def crop_px(self, step: int) -> int:
        if len(self.crop_sizes) == 1:
            return self.crop_sizes[0]
        return self.crop_sizes[int(_rng(self.seed, self.epoch, 1, step).integers(len(self.crop_sizes)))]

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[Key]]:
        for s in range(self.start, self.steps):
            first = s * self.batch_size + self.rank * self.local
            crop = self.crop_px(s)
            yield [(self.epoch, g, crop) for g in range(first, first + self.local)]


def make_loader(
    dataset: WeakCropDataset, batch_sampler: WeakBatchSampler, workers: int, pin_memory: bool
) -> DataLoader[dict[str, Any]]:
    """Workers augment in their own processes (persistent across epochs, 2 batches prefetched
    each); ``pin_memory`` only matters for copies to a CUDA device."""
    if workers < 0:
        raise DatasetError(f"loader.workers must be 0 or more, got {workers}")
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
        # its own generator: starting an epoch's iterator must not draw from the global torch RNG
        # (a resumed run would then drift from an uninterrupted one; the crops use their keys)
        generator=torch.Generator().manual_seed(0),
    )


__all__ = ["Augment", "WeakBatchSampler", "WeakCropDataset", "flip_rotate", "make_loader"]
