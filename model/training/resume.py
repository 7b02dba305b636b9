"""A training run's resume state: ``resume.pt`` in the run folder, enough to continue exactly.

Why a module of its own: what must be saved for an exact resume (model, optimiser, GradScaler,
every rank's RNG states and running loss sums, the loader position, the history, the config it
ran with) is one contract between the writer and the reader; here both sides of it sit together.
A resumed run must run with the same config, except for the keys of :data:`RESUME_FREE_KEYS`
(how the run is executed, not what it computes).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from fprotoseg.model.errors import ConfigurationError
from fprotoseg.model.training.ranks import Ranks

RESUME_FILE = "resume.pt"
# keys a resumed run may change: how the run is executed, not what it computes (train.epochs
# extends or shortens the schedule: the poly learning rate then follows the new length)
RESUME_FREE_KEYS = frozenset(
    {"train.epochs", "train.threads", "train.checkpoint_every_steps", "train.tensorboard",
     "loader.workers", "loader.pin_memory"}
)


@dataclass
class Progress:
    """Where a run stands (what a resume state restores)."""

    epoch: int = 0  # epochs done
    step: int = 0  # steps done in the next epoch (a mid-epoch state), else 0
    best_miou: float = -1.0  # the kept checkpoint's score
    elapsed_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch done
    sums: dict[str, float] = field(default_factory=dict)  # this rank's loss sums of the epoch in progress


def flat_config(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``."""
    if isinstance(cfg, dict) and cfg:
        out: dict[str, Any] = {}
        for k, v in cfg.items():
            out.update(flat_config(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: cfg}


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs (a key missing on one side differs)."""
    fa = flat_config(json.loads(json.dumps(a, default=str)))
    fb = flat_config(json.loads(json.dumps(b, default=str)))
    return sorted(k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...))


def rng_state() -> dict[str, Any]:
    """This process's torch, CUDA, numpy and Python random states (plain types and tensors)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_resume_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically (tmp file, then rename): a run killed while writing keeps the previous state."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_resume_state(path: Path) -> dict[str, Any]:
    """Tensors and plain Python types only (``weights_only``: no code runs from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file
        raise ConfigurationError(
            f"{path} is not a readable resume state ({str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != 1:
        raise ConfigurationError(f"{path} is not a fprotoseg resume state")
    return state


def open_resume_state(out_dir: Path, run_config: dict[str, Any]) -> dict[str, Any]:
    """The run folder's resume state, refused (one line) when it is missing or ran with another
    config than ``run_config`` (outside :data:`RESUME_FREE_KEYS`)."""
    path = out_dir / RESUME_FILE
    if not path.is_file():
        raise ConfigurationError(
            f"--resume: no {RESUME_FILE} in {out_dir} (nothing to resume; drop --resume to start afresh)"
        )
    state = load_resume_state(path)
    differ = [k for k in config_diff(state["config"], run_config) if k not in RESUME_FREE_KEYS]
    if differ:
        raise ConfigurationError(
            f"--resume: {path} ran with another config; keys that differ: {', '.join(differ)}"
        )
    return state


def restore(
    state: dict[str, Any],
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ranks: Ranks,
) -> Progress:
    """Load a resume state into the run's objects and this rank's RNGs; returns where it stood."""
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    mine = state["ranks"][ranks.rank if ranks.rank < len(state["ranks"]) else 0]
    set_rng_state(mine["rng"])
    return Progress(
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        best_miou=float(state["best_miou"]),
        elapsed_s=float(state["elapsed_s"]),
        history=json.loads(state["history"]),
        sums=dict(mine["sums"]),
    )


def write_resume_state(
    path: Path,
    run_config: dict[str, Any],
    progress: Progress,
    sums: dict[str, torch.Tensor],
    module: torch.nn.Module,
    opt: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    ranks: Ranks,
) -> None:
    """Collective (every rank's RNG state and loss sums are gathered); rank 0 writes."""
    own = {"rng": rng_state(), "sums": {k: float(v) for k, v in sums.items()}}
    states: list[Any] = [own]
    if ranks.distributed:
        states = [None] * ranks.world_size
        dist.all_gather_object(states, own)
    if not ranks.main:
        return
    save_resume_state(path, {
        "format": 1,
        "config": json.loads(json.dumps(run_config, default=str)),
        "epoch": progress.epoch,
        "step": progress.step,
        "best_miou": progress.best_miou,
        "elapsed_s": progress.elapsed_s,
        "history": json.dumps(progress.history),
        "model": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "optimizer": opt.state_dict(),
        "scaler": scaler.state_dict(),
        "ranks": states,
        "world_size": ranks.world_size,
    })


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names and raw bytes (the ranks of a DDP run must agree on it)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = [
    "RESUME_FILE",
    "RESUME_FREE_KEYS",
    "Progress",
    "config_diff",
    "flat_config",
    "open_resume_state",
    "restore",
    "tensors_digest",
    "write_resume_state",
]
