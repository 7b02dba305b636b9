"""Benchmark of the training input pipeline against the training step, on CPU (or CUDA if asked).

What it prints (nothing is pass/fail):
- data-loading images/s of the training loader (``model/loader.py``: lazy decode, crop with its
  image-level label, rot/flip, RGB + HED stain jitter, collate) with 0, 1 and 2 worker processes,
  nothing else running; ``--cache`` keeps decoded images (the default cache), otherwise every crop
  decodes its image again (the case of a full dataset much larger than the cache),
- training images/s of the default encoder's stage-1 step (forward, losses, backward, AdamW) on
  preloaded batches (the ceiling), and end to end with the loader's 2 workers feeding it,
- the ratios: loader (2 workers) / training ceiling (> 1: the loader could keep up on its own), and
  end to end / ceiling (1.0: the loader is not the bottleneck of a training step, even sharing
  the same cores).

Default: ``model/configs/wsss4luad_default.yaml`` (EfficientNet-Lite0, text-prototype CAMs) at
224 px crops, its batch size and threads, data from ../shared/data (the config's paths).

    python bench/train.py [--config CFG] [--crop 224] [--steps 20] [--loader-batches 40] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def loader_rate(
    data: Any, cfg: dict[str, Any], crop: int, batch: int, workers: int, n: int, cache: bool
) -> float:
    """Images/s of the training loader alone (the first batch, with the workers' start, excluded)."""
    from fprotoseg.model.datasets import DATASETS
    from fprotoseg.model.loader import Augment, WeakBatchSampler, WeakCropDataset, make_loader

    tcfg = cfg.get("train", {})
    k = len(DATASETS[data.dataset].classes)
    ds = WeakCropDataset(
        data.train, k, float(cfg["data"].get("min_fraction", 0.03)), seed=0, area_crop_px=crop,
        augment=Augment.from_config(tcfg), glass_prob=float(tcfg.get("glass_prob", 0.0)),
        cache_bytes=(256 << 20) if cache else 0,
    )
    sampler = WeakBatchSampler(batch, n + 1, [crop], seed=0)
    it = iter(make_loader(ds, sampler, workers, pin_memory=False))
    next(it)
    t = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t)


def build_stage1(cfg: dict[str, Any], k: int, names: list[str], device: str) -> Any:
    import torch

    from fprotoseg.model.fprotoseg import Stage1Inference
    from fprotoseg.model.text import class_text_embeddings

    emb, _ = class_text_embeddings(names, cfg.get("text", {}))
    module = Stage1Inference(cfg, k, emb.shape[1])
    module.net.text_embeddings.data.copy_(torch.from_numpy(emb))
    if cfg.get("encoder", {}).get("pretrained") == "imagenet":
        from fprotoseg.model.pretrained import load_encoder_weights

        load_encoder_weights(module.net.encoder, "imagenet")
    return module.to(device).train()


def train_rate(
    module: Any, cfg: dict[str, Any], batches: Any, steps: int, device: str, preload: bool
) -> float:
    """Images/s of stage-1 training steps; ``batches`` an iterator of loader batches."""
    import torch

    from fprotoseg.model.fprotoseg import encoder_normalisation
    from fprotoseg.model.train import LossModel, to_input

    norm = encoder_normalisation(cfg.get("encoder", {}))
    loss_model = LossModel(module.net, 1, cfg.get("loss", {}))
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5)
    feed = [next(batches) for _ in range(steps + 1)] if preload else None

    def step(b: dict[str, Any]) -> int:
        x = to_input(b["x"], device, norm)
        loss = loss_model(x, b["label"].to(device))["total"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return len(x)

    step(feed[0] if feed else next(batches))  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    t, images = time.perf_counter(), 0
    for i in range(steps):
        images += step(feed[i + 1] if feed else next(batches))
    if device == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "model" / "configs" / "wsss4luad_default.yaml"))
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--batch", type=int, default=None, help="default: the config's train.batch_size")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps")
    ap.add_argument("--loader-batches", type=int, default=40, help="timed loader batches per worker count")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--cache", action="store_true", help="keep decoded images (default: decode per crop)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from fprotoseg.model.datasets import DATASETS
    from fprotoseg.model.loader import Augment, WeakBatchSampler, WeakCropDataset, make_loader
    from fprotoseg.model.train import build_data, load_config

    cfg = load_config(args.config)
    tcfg = cfg.get("train", {})
    batch = args.batch or int(tcfg.get("batch_size", 16))
    threads = int(tcfg.get("threads") or torch.get_num_threads())
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
        data.train, k, float(cfg["data"].get("min_fraction", 0.03)), seed=0, area_crop_px=args.crop,
        augment=Augment.from_config(tcfg), glass_prob=float(tcfg.get("glass_prob", 0.0)),
        cache_bytes=(256 << 20) if args.cache else 0,
    )

    def batches(w: int) -> Any:
        sampler = WeakBatchSampler(batch, 2 * args.steps + 2, [args.crop], seed=1)
        return iter(make_loader(ds, sampler, w, pin_memory=args.device == "cuda"))

    ceiling = train_rate(module, cfg, batches(0), args.steps, args.device, preload=True)
    fed = max(w for w in workers)
    end_to_end = train_rate(module, cfg, batches(fed), args.steps, args.device, preload=False)
    result = {
        "config": Path(args.config).name,
        "encoder": cfg.get("encoder", {}).get("variant"),
        "device": args.device,
        "crop_px": args.crop,
        "batch": batch,
        "torch_threads": threads,
        "cpus": os.cpu_count(),
        "decode_cache": args.cache,
        "loader_img_s": {str(w): round(v, 1) for w, v in loader.items()},
        "train_img_s_preloaded": round(ceiling, 2),
        f"train_img_s_fed_by_{fed}_workers": round(end_to_end, 2),
        f"ratio_loader_{fed}_workers_to_train": round(loader[fed] / ceiling, 2),
        "ratio_end_to_end_to_preloaded": round(end_to_end / ceiling, 3),
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for kk, v in result.items():
            print(f"{kk:>36}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
