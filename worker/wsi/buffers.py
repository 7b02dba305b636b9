"""Slide-sized arrays outside the malloc heap.

Why: the worker runs with ``MALLOC_MMAP_MAX_=0`` and a huge trim threshold (torch is twice as fast
on CPU when glibc keeps its buffers), so every large numpy array would come from the heap, which
never shrinks: a label map freed after one slide, or a tissue mask freed after its stage, leaves a
hole that later allocations only partly reuse, and peak RSS would grow with slide area by more
than the arrays themselves. An anonymous mapping is returned to the OS exactly when the array
dies, and its pages count only once written.
"""

from __future__ import annotations

import math
import mmap

import numpy as np


def anonymous_array(shape: tuple[int, ...], dtype: np.dtype | type = np.uint8) -> np.ndarray:
    """A zero-filled array backed by its own anonymous mmap (unmapped when the array is freed)."""
    dtype = np.dtype(dtype)
    nbytes = max(1, math.prod(shape) * dtype.itemsize)
    buffer = mmap.mmap(-1, nbytes)
    return np.frombuffer(buffer, dtype=dtype, count=math.prod(shape)).reshape(shape)
