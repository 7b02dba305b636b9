"""Benchmark of the training input pipeline against the training step, on CPU (or CUDA if asked).

What it prints (nothing is pass/fail):
- data-loading images/s of the training loader (``model/training/loader.py``: lazy decode, crop with its
  image-level label, rot/flip, RGB + HED stain jitter, collate) with 0, 1 and 2 worker processes,
  nothing else running; ``--cache`` keeps decoded images (the default cache), otherwise every crop
  decodes its image again (the case of a full dataset much larger than the cache),
- training images/s of the default encoder's stage-1 step (forward, losses, backward, AdamW) on
  preloaded batches (the ceiling), and end to end with the loader's 2 workers feeding it,
- the ratios: loader (2 workers) / training ceiling (> 1: the loader could keep up on its own), and
  end to end / ceiling (1.0: the loader is not the bottleneck of a training step, even sharing
  the same cores), and the share of the fed steps' time spent waiting for a batch.

Default: ``model/configs/wsss4luad_default.yaml`` (EfficientNet-Lite0, text-prototype CAMs) at
224 px crops, its batch size and threads, data from ../shared/data (the config's paths).

    python bench/train.py [--config CFG] [--crop 224] [--steps 5] [--rounds 3] [--cache] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]

if TYPE_CHECKING:
    from fprotoseg.model.config_schema import TrainConfig


def loader_rate(
    data: Any, cfg: TrainConfig, crop: int, batch: int, workers: int, n: int, cache: bool
) -> float:
    """Images/s of the training loader alone (the first batch, with the workers' start, excluded)."""
    from fprotoseg.model.training.datasets import DATASETS
    from fprotoseg.model.training.loader import Augment, WeakBatchSampler, WeakCropDataset, make_loader

    k = len(DATASETS[data.dataset].classes)
    ds = WeakCropDataset(
        data.train, k, cfg.data.min_fraction, seed=0, area_crop_px=crop,
        augment=Augment.from_config(cfg.train), glass_prob=cfg.train.glass_prob,
        cache_bytes=(256 << 20) if cache else 0,
    )
    sampler = WeakBatchSampler(batch, n + 1, [crop], seed=0)
    it = iter(make_loader(ds, sampler, workers, pin_memory=False))
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t)


def build_stage1(cfg: TrainConfig, k: int, names: list[str], device: str) -> Any:
    import torch

    from fprotoseg.model.networks.fprotoseg import Stage1Inference
    from fprotoseg.model.networks.text import class_text_embeddings

    emb, _ = class_text_embeddings(names, cfg.text)
    module = Stage1Inference(cfg, k, emb.shape[1])
    module.net.text_embeddings.data.copy_(torch.from_numpy(emb))
    if cfg.encoder.pretrained == "imagenet":
        from fprotoseg.model.networks.pretrained import load_encoder_weights

        load_encoder_weights(module.net.encoder, "imagenet")
    return module.to(device).train()


def train_rates(
    module: Any,
    cfg: TrainConfig,
    preloaded: list[Any],
    fed: Callable[[], Iterator[Any]],
    steps: int,
    rounds: int,
    device: str,
) -> tuple[float, float, float]:
    """Images/s of stage-1 training steps (forward, losses, backward, AdamW) on preloaded batches
    and on batches the loader's workers deliver meanwhile, in alternating rounds (a shared
    machine's load drifts; both see the same drift). Each fed round starts a fresh loader and
    takes one untimed step: its workers' buffer is full at both ends of the timed steps, so they
    produce one batch per step in the window, as in a long epoch. Also returns the share of the
    fed rounds' time spent waiting for the next batch (0: the loader is never the bottleneck)."""
    import torch

    from fprotoseg.model.networks.fprotoseg import encoder_normalisation
    from fprotoseg.model.training.train import LossModel, to_input

    norm = encoder_normalisation(cfg.encoder)
    loss_model = LossModel(module.net, 1, cfg.loss)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)

    def step(b: dict[str, Any]) -> int:
        x = to_input(b["x"], device, norm)
        loss = loss_model(x, b["label"].to(device))["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(x)

    def timed(source: Any) -> tuple[int, float, float]:
        """(images, seconds, seconds spent waiting for batches) over ``steps`` steps."""
        if device == "cuda":
            torch.cuda.synchronize()
        t, images, waited = time.perf_counter(), 0, 0.0
        for _ in range(steps):
            t_wait = time.perf_counter()
            b = next(source)
            waited += time.perf_counter() - t_wait
            images += step(b)
        if device == "cuda":
            torch.cuda.synchronize()
        return images, time.perf_counter() - t, waited

    step(preloaded[0])  # warm-up (allocator, kernels)
    pre, fed_ = [0, 0.0], [0, 0.0, 0.0]
    for _ in range(rounds):
        n, dt, _w = timed(iter(preloaded[1 : steps + 1]))
        pre[0] += n
        pre[1] += dt
        source = fed()
        step(next(source))  # the workers' start, untimed
        n, dt, w = timed(source)
        fed_[0] += n
        fed_[1] += dt
        fed_[2] += w
        del source  # its workers stop before the next preloaded round
    return pre[0] / pre[1], fed_[0] / fed_[1], fed_[2] / fed_[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "model" / "configs" / "wsss4luad_default.yaml"))
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=None, help="default: the config's train.batch_size")
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per round and mode")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (preloaded, fed)")
    ap.add_argument("--loader-batches", type=int, default=40, help="timed loader batches per worker count")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--cache", action="store_true", help="keep decoded images (default: decode per crop)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from fprotoseg.model.config_schema import load_config
    from fprotoseg.model.training.datasets import DATASETS
    from fprotoseg.model.training.loader import Augment, WeakBatchSampler, WeakCropDataset, make_loader
    from fprotoseg.model.training.train import build_data

    cfg = load_config(args.config)
    batch = args.batch or cfg.train.batch_size
    threads = cfg.train.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = build_data(cfg)
    spec = DATASETS[data.dataset]
    k = len(spec.classes)
    workers = [int(w) for w in args.workers.split(",")]
    loader = {
        w: loader_rate(data, cfg, args.crop, batch, w, args.loader_batches, args.cache) for w in workers
    }

    module = build_stage1(cfg, k, list(spec.qupath_names), args.device)
    ds = WeakCropDataset(
        data.train, k, cfg.data.min_fraction, seed=0, area_crop_px=args.crop,
        augment=Augment.from_config(cfg.train), glass_prob=cfg.train.glass_prob,
        cache_bytes=(256 << 20) if args.cache else 0,
    )

    def batches(w: int, n: int) -> Any:
        sampler = WeakBatchSampler(batch, n, [args.crop], seed=1)
        return iter(make_loader(ds, sampler, w, pin_memory=args.device == "cuda"))

    fed_by = max(workers)
    preloaded = list(batches(0, args.steps + 1))
    ceiling, end_to_end, wait_frac = train_rates(
        module, cfg, preloaded, lambda: batches(fed_by, args.steps + 1), args.steps, args.rounds, args.device
    )
    result = {
        "config": Path(args.config).name,
        "encoder": cfg.get("encoder", {}).get("variant"),
        "device": args.device,
        "crop_px": args.crop,
        "batch": batch,
        "torch_threads": threads,
        "timed_train_steps": args.steps * args.rounds,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "decode_cache": args.cache,
        "loader_img_s": {str(w): round(v, 1) for w, v in loader.items()},
        "train_img_s_preloaded": round(ceiling, 2),
        f"train_img_s_fed_by_{fed_by}_workers": round(end_to_end, 2),
        f"ratio_loader_{fed_by}_workers_to_train": round(loader[fed_by] / ceiling, 2),
        "ratio_end_to_end_to_preloaded": round(end_to_end / ceiling, 3),
        f"fed_by_{fed_by}_workers_data_wait_frac": round(wait_frac, 4),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for kk, v in result.items():
            print(f"{kk:>36}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
