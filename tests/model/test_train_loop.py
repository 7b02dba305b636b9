"""The training loop around the network: the torch.utils.data pipeline, DDP under torchrun
(two CPU processes on Gloo), exact resume from a mid-epoch checkpoint after a real kill, and the
one-line refusals of --resume. Data: the generated tissue-like pairs of test_train.py."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from tests.model.test_train import _tiny_config, _write_generated_pairs


def _config(tmp_path: Path, epochs: int = 2, **train: Any) -> dict[str, Any]:
    root = tmp_path / "data"
    if not root.is_dir():
        _write_generated_pairs(root, 12, seed=0)
    cfg = _tiny_config(root, [f"{i:02d}.png" for i in range(3)], epochs=epochs)
    cfg["train"].update(keep="last", **train)
    cfg["loader"] = {"workers": 1}
    return cfg


def _write(cfg: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str, **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "fprotoseg.app.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw,
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from fprotoseg.model.checkpoint import read_checkpoint

    return read_checkpoint(path)[0]


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_crops_do_not_depend_on_workers_or_ranks(tmp_path: Path) -> None:
    """The same keys give the same crops with 0 or 2 worker processes, and two ranks' shares of a
    global batch are the one-process batch; a mid-epoch start skips exactly the steps done."""
    from fprotoseg.model.training.datasets import list_pairs, weak_refs_from_pairs
    from fprotoseg.model.training.loader import Augment, WeakBatchSampler, WeakCropDataset, make_loader

    _write_generated_pairs(tmp_path / "d", 6, seed=2)
    refs = weak_refs_from_pairs(list_pairs(tmp_path / "d"), 3, 0.03)
    ds = WeakCropDataset(
        refs, 3, 0.03, seed=5, area_crop_px=48, augment=Augment(0.1, 0.1, 0.05), glass_prob=0.3, clean=True
    )

    def epoch(workers: int, rank: int = 0, world: int = 1, start: int = 0) -> list[dict[str, Any]]:
        sampler = WeakBatchSampler(8, 4, [32, 48], seed=5, rank=rank, world_size=world)
        sampler.set_epoch(1, start)
        return list(make_loader(ds, sampler, workers, pin_memory=False))

    one = epoch(0)
    assert {tuple(b["x"].shape[1:]) for b in one} <= {(32, 32, 3), (48, 48, 3)}
    assert all(b["x"].dtype == torch.uint8 and b["x"].shape[0] == 8 for b in one)
    for a, b in zip(one, epoch(2), strict=True):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])
    r0, r1 = epoch(0, 0, 2), epoch(0, 1, 2)
    for a, h0, h1 in zip(one, r0, r1, strict=True):
        assert torch.equal(a["x"], torch.cat([h0["x"], h1["x"]]))
        assert torch.equal(a["clean"], torch.cat([h0["clean"], h1["clean"]]))
    assert all(torch.equal(a["x"], b["x"]) for a, b in zip(one[2:], epoch(0, start=2), strict=True))
    assert all(set(np.unique(b["label"].numpy())) <= {0.0, 1.0} for b in one)  # image-level only
    assert not torch.equal(one[0]["x"], one[0]["clean"])  # stain jitter on x only


def test_resume_without_state_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fprotoseg.app.cli import main

    cfg = _write(_config(tmp_path), tmp_path / "tiny.yaml")
    code = main(["train", str(cfg), "--out", str(tmp_path / "empty"), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "resume.pt" in err, err


def test_resume_with_another_config_names_the_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run resumes only with the config it ran with (runtime keys such as loader.workers and
    train.epochs may change); the refusal is one line naming the keys that differ."""
    from fprotoseg.app.cli import main

    cfg = _config(tmp_path, epochs=1, iters_per_epoch=2, tensorboard=True)
    pytest.importorskip("tensorboard")
    path = _write(cfg, tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    assert main(["train", str(path), "--out", str(out), "--no-progress"]) == 0
    row = _rows(out)[0]
    assert float(row["train_img_s"]) > 0 and float(row["load_img_s"]) > 0
    assert 0.0 <= float(row["data_wait_frac"]) <= 1.0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    capsys.readouterr()
    changed = {**cfg, "train": {**cfg["train"], "lr": 1e-3}, "data": {**cfg["data"], "crop_px": 32}}
    code = main(["train", str(_write(changed, path)), "--out", str(out), "--resume", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "data.crop_px, train.lr" in err, err
    # how it runs may change: more epochs, other workers
    more = {**cfg, "train": {**cfg["train"], "epochs": 2}, "loader": {"workers": 0}}
    assert main(["train", str(_write(more, path)), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert [r["epoch"] for r in _rows(out)] == ["1", "2"]


def test_tensorboard_missing_is_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fprotoseg.app.cli import main

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    path = _write(_config(tmp_path, tensorboard=True), tmp_path / "tiny.yaml")
    assert main(["train", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tensorboard" in err, err


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Kill the training process (SIGKILL, by PID) right after its first mid-epoch checkpoint;
    ``--resume`` then reaches the weights and losses of an uninterrupted run with the same seed
    on CPU. Tolerance: bit-identical (atol 0) — same process layout, one thread."""
    from fprotoseg.model.training.train import train

    cfg = _config(tmp_path, epochs=2, iters_per_epoch=12, checkpoint_every_steps=3)
    cfg["encoder"]["drop_path_rate"] = 0.2  # draws from the torch RNG: its state must resume too
    path = _write(cfg, tmp_path / "tiny.yaml")
    whole = tmp_path / "whole"
    train(cfg, whole, device="cpu", progress=False, log=lambda s: None)

    cut = tmp_path / "cut"
    proc = _cli("train", str(path), "--out", str(cut), "--device", "cpu", "--no-progress")
    state = cut / "resume.pt"
    deadline = time.time() + 120
    while not state.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.communicate()
    assert not (cut / "result.json").exists()  # really interrupted
    saved = torch.load(state, weights_only=True)
    where = (saved["epoch"], saved["step"])
    assert where[1] > 0, f"killed after an epoch-end checkpoint {where}, not mid-epoch"

    proc = _cli("train", str(path), "--out", str(cut), "--device", "cpu", "--no-progress", "--resume")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert f"at epoch {where[0] + 1} step {where[1]}" in out + err
    a, b = _weights(whole / "final.safetensors"), _weights(cut / "final.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    ra, rb = _rows(whole), _rows(cut)
    assert [r["train_loss"] for r in ra] == [r["train_loss"] for r in rb]
    assert [r["val_miou"] for r in ra] == [r["val_miou"] for r in rb]


@pytest.mark.slow
def test_torchrun_two_cpu_processes_end_with_identical_weights(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2`` on CPU (Gloo): the same command, DDP; both ranks end with
    identical parameters and buffers (SHA-256 of each rank's state, gathered), equal to the one
    checkpoint rank 0 wrote; rank 0 alone wrote the files."""
    from fprotoseg.model.training.resume import tensors_digest

    cfg = _config(tmp_path, epochs=2, iters_per_epoch=4)
    path = _write(cfg, tmp_path / "tiny.yaml")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "fprotoseg.app.cli", "train", str(path), "--out", str(out), "--device", "cpu",
         "--no-progress"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["world_size"] == 2
    h0, h1 = result["rank_state_sha256"]
    assert h0 == h1 == tensors_digest(_weights(out / "final.safetensors"))
    assert len(_rows(out)) == 2 and proc.stdout.count("epoch 2/2 loss") == 1  # one log
