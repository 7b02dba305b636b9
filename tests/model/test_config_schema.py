"""Configs are checked against a schema before anything loads: a typo, a wrong type or a missing
dataset root is ONE line on stderr naming it, and exit code 2 (the real CLI, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fprotoseg.model.errors import ConfigurationError
from tests.conftest import REPO_ROOT

CONFIGS = sorted((REPO_ROOT / "model" / "configs").glob("*.yaml"))


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "fprotoseg.app.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def _config(tmp_path: Path, text: str) -> Path:
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True, exist_ok=True)
    (data / "mask").mkdir(exist_ok=True)
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("DATA", str(data)))
    return path


GOOD = """
name: tiny
data: {dataset: wsss4luad, pairs_root: DATA, holdout: [a.png]}
encoder: {variant: b0, depths: [1, 1, 1, 1]}
train: {epochs: 1, iters_per_epoch: 2}
"""


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # a typo: the closest valid key is named
        ("train: {epoch: 1, iters_per_epoch: 2}", "unknown key train.epoch (did you mean train.epochs?)"),
        # a wrong type
        (
            "train: {epochs: ten, iters_per_epoch: 2}",
            "train.epochs: input should be a valid integer, got 'ten'",
        ),
        # a dataset root that does not exist
        (
            "data: {dataset: wsss4luad, pairs_root: DATA/nowhere, holdout: [a.png]}",
            "data.pairs_root: folder not found",
        ),
    ],
    ids=["typo", "wrong-type", "missing-root"],
)
def test_bad_config_is_one_line_and_exit_2(tmp_path: Path, change: str, expected: str) -> None:
    text = GOOD.replace(
        "train: {epochs: 1, iters_per_epoch: 2}"
        if change.startswith("train")
        else "data: {dataset: wsss4luad, pairs_root: DATA, holdout: [a.png]}",
        change,
    )
    cfg = _config(tmp_path, text)
    proc = _run_cli("train", str(cfg), "--out", str(tmp_path / "out"), "--no-progress")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fprotoseg: error: run.yaml: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing started


def test_pseudo_refuses_a_missing_root_in_one_line(tmp_path: Path) -> None:
    text = GOOD.replace("pairs_root: DATA,", "pairs_root: DATA/gone,")
    ckpt = tmp_path / "s1.safetensors"
    proc = _run_cli(
        "pseudo", str(_config(tmp_path, text)), "--checkpoint", str(ckpt), "--out", str(tmp_path / "p")
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.pairs_root: folder not found" in lines[0], lines


def test_unset_dataset_root_variable_is_named(tmp_path: Path) -> None:
    """The published recipes name their data by environment variable; unset, the line says so."""
    env = {k: v for k, v in os.environ.items() if k != "LUAD_HISTOSEG"}
    proc = _run_cli("train", "luad_histoseg.yaml", "--out", str(tmp_path / "o"), env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "data.labelled_dirs[0] $LUAD_HISTOSEG/training" in lines[0], lines
    assert "LUAD_HISTOSEG, which is not set" in lines[0]


def test_set_override_typo_is_caught(tmp_path: Path) -> None:
    proc = _run_cli(
        "train", str(_config(tmp_path, GOOD)), "--set", "loader.workrs=4", "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "fprotoseg: error: run.yaml: unknown key loader.workrs (did you mean loader.workers?)"
    )


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path: Path) -> None:
    from fprotoseg.model.config_schema import load_config

    cfg = load_config(path, check_paths=False)
    assert cfg.name


def test_keys_the_trainer_reads_are_in_the_schema() -> None:
    """Keys colleagues' code reads (loader, mid-epoch checkpoints, TensorBoard, stage-2 encoder and
    background) validate with their types, and their defaults are the documented ones."""
    from fprotoseg.model.config_schema import as_train_config, defaults

    cfg = {
        "data": {"dataset": "luad-histoseg", "labelled_dirs": ["x"], "val_root": "y"},
        "loader": {"workers": 4, "pin_memory": False},
        "train": {"checkpoint_every_steps": 50, "tensorboard": True, "amp": "fp16"},
        "stage": 2,
        "stage2": {
            "teacher": "t.safetensors",
            "background": True,
            "encoder": {"variant": "lite2"},
            "white_prior": {"grey": 210, "max_saturation": 0.15, "open_px": 3},
        },
    }
    typed = as_train_config(cfg)
    assert typed.stage2.white_prior.open_px == 3 and typed.loader.workers == 4
    assert as_train_config(typed) is typed
    d = defaults()
    assert d["loader"] == {"workers": 2, "pin_memory": True}
    assert d["train"]["checkpoint_every_steps"] == 0 and d["train"]["tensorboard"] is False
    with pytest.raises(ConfigurationError, match=r"loader.pin_memory: input should be a valid boolean"):
        as_train_config({**cfg, "loader": {"pin_memory": "sometimes"}})
    with pytest.raises(ConfigurationError, match=r"output_stride is an option of EfficientNet-Lite"):
        as_train_config({**cfg, "encoder": {"variant": "b1", "output_stride": 16}})
    with pytest.raises(ConfigurationError, match=r"missing key data"):
        as_train_config({"stage": 1})


# the modules that read a training config: they take the validated TrainConfig (or one of its
# sections) and read attributes, which mypy checks against the schema
CONFIG_READERS = (
    "training/train", "networks/fprotoseg", "training/pseudo", "training/pseudo_export", "training/stage2",
    "networks/text", "training/loader", "training/resume", "training/history", "training/ranks",
    "config_schema",
)


def _schema_keys() -> set[str]:
    from pydantic import BaseModel

    from fprotoseg.model import config_schema

    keys: set[str] = set()
    for obj in vars(config_schema).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel:
            keys |= set(obj.model_fields)
    return keys


def dict_reads_of_config_keys(text: str) -> list[str]:
    """Reads of the config as a dict, whatever the variable: any schema key read with a default
    (``x.get("epochs"``, chained ``cfg.get("data", {}).get("mpp"``) and any section taken by
    subscript (``cfg["stage2"]``, the start of every other dict read of the config)."""
    import re

    from pydantic import BaseModel

    from fprotoseg.model.config_schema import TrainConfig

    keys = _schema_keys()
    sections = {
        k for k, f in TrainConfig.model_fields.items()
        if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
    }
    defaulted = {k for k in re.findall(r'\.get\(\s*"([a-z_0-9]+)"', text) if k in keys}
    subscripted = {k for k in re.findall(r'\[\s*"([a-z_0-9]+)"\s*\]', text) if k in sections}
    return sorted(defaulted | subscripted)


def test_the_finder_sees_the_reads_that_slipped_past_the_old_test() -> None:
    """The old check matched ``loader_cfg.get(`` while the trainer read ``lcfg.get(``, and
    missed chained reads: this one names the key whatever the variable or the chain."""
    old_trainer = (
        'lcfg = cfg.get("loader", {})\n'
        'workers = int(lcfg.get("workers", 2))\n'
        'fusion = cfg.get("inference", {}).get("fusion", [0.0, 0.3, 0.3, 0.4])\n'
        'init = cfg["stage2"].get("init_encoder_from_teacher", True)\n'
    )
    assert dict_reads_of_config_keys(old_trainer) == [
        "fusion", "inference", "init_encoder_from_teacher", "loader", "stage2", "workers",
    ]
    assert dict_reads_of_config_keys('manifest.get("architecture")\nrow["epoch"]') == []


@pytest.mark.parametrize("module", CONFIG_READERS)
def test_config_readers_read_attributes_not_dict_keys(module: str) -> None:
    """Every training module reads the typed config: a default stated beside a ``.get`` would
    override the schema's, and a key missing from the schema would pass unnoticed. (Manifest
    records are not config: their ``text`` record is left out.)"""
    text = (REPO_ROOT / "model" / f"{module}.py").read_text()
    text = text.replace('manifest.get("text", {}).get("dim", 384)', "").replace('manifest.get("text"', "")
    assert dict_reads_of_config_keys(text) == [], module


def test_the_fusion_default_is_written_once() -> None:
    """The level-fusion default is stated in the schema alone (it was written in 9 places)."""
    hits = []
    for path in [*(REPO_ROOT / "model").rglob("*.py"), *(REPO_ROOT / "bench").glob("*.py")]:
        hits += [path.name for line in path.read_text().splitlines() if "0.0, 0.3, 0.3, 0.4" in line]
    assert hits == ["config_schema.py"], hits
