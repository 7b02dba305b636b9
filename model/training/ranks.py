"""Where a training process stands in a ``torchrun`` job, and work shared over the ranks.

Why a module of its own: the trainer, validation and the resume state all ask the same two
questions (am I rank 0? is this run distributed?); one process is rank 0 of 1, so the same code
runs with and without ``torchrun``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from fprotoseg.model.training.datasets import MaskedImage


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a ``torchrun`` job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_ranks(device: str) -> tuple[Ranks, bool]:
    """Join the ``torchrun`` process group (NCCL on CUDA, Gloo on CPU) when ``WORLD_SIZE`` > 1;
    returns the ranks and whether this call created the group (and so must destroy it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks(), False
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "cuda":
        torch.cuda.set_device(ranks.local_rank)  # "cuda" is this rank's GPU from here on
    if dist.is_initialized():
        return ranks, False
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return ranks, True


def sharded(
    items: list[MaskedImage], label_fn: Callable[[MaskedImage], np.ndarray], ranks: Ranks | None
) -> Callable[[MaskedImage], np.ndarray]:
    """``label_fn`` computed on this rank's share of ``items`` and gathered: every rank gets the
    labels of all items (and so the same metrics). Identity on one process."""
    if ranks is None or not ranks.distributed:
        return label_fn
    mine = {i: label_fn(items[i]) for i in range(ranks.rank, len(items), ranks.world_size)}
    parts: list[dict[int, np.ndarray] | None] = [None] * ranks.world_size
    dist.all_gather_object(parts, mine)
    merged = {i: lab for part in parts if part for i, lab in part.items()}
    index = {id(p): i for i, p in enumerate(items)}
    return lambda p: merged[index[id(p)]]


def sync_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """BatchNorm running statistics: rank 0's everywhere (each rank updated them on its own
    share of the last batch)."""
    if ranks.distributed:
        for b in module.buffers():
            dist.broadcast(b, 0)


__all__ = ["Ranks", "init_ranks", "sharded", "sync_buffers"]
