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
    from fprotoseg.model.train import load_config

    cfg = load_config(path, check_paths=False)
    assert cfg["name"]


def test_keys_the_trainer_reads_are_in_the_schema() -> None:
    """Keys colleagues' code reads (loader, mid-epoch checkpoints, TensorBoard, stage-2 encoder and
    background) validate with their types, and their defaults are the documented ones."""
    from fprotoseg.model.config_schema import defaults, validate_config

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
    assert validate_config(cfg) is cfg
    d = defaults()
    assert d["loader"] == {"workers": 2, "pin_memory": True}
    assert d["train"]["checkpoint_every_steps"] == 0 and d["train"]["tensorboard"] is False
    with pytest.raises(ConfigurationError, match=r"loader.pin_memory: input should be a valid boolean"):
        validate_config({**cfg, "loader": {"pin_memory": "sometimes"}})
    with pytest.raises(ConfigurationError, match=r"output_stride is an option of EfficientNet-Lite"):
        validate_config({**cfg, "encoder": {"variant": "b1", "output_stride": 16}})
    with pytest.raises(ConfigurationError, match=r"missing key data"):
        validate_config({"stage": 1})


# how the code names each config section when it reads keys from it (``tcfg.get("epochs")``)
SECTION_VARIABLES = {
    "tcfg": "TrainSection",
    "inf": "InferenceConfig",
    "loss_cfg": "LossConfig",
    "proto_cfg": "PrototypesConfig",
    "s2": "Stage2Config",
    'cfg["stage2"]': "Stage2Config",
    "enc_cfg": "EncoderConfig",
    "text_cfg": "TextConfig",
    "d": "DataConfig",
    'cfg["data"]': "DataConfig",
    "entry": "ClassDir",
    "loader_cfg": "LoaderConfig",
}


def test_every_key_the_code_reads_is_in_the_schema() -> None:
    """Reads like ``tcfg.get("key")`` / ``s2["key"]`` in model/ name keys of the schema (a key
    added to the trainer without the schema would make its configs fail validation)."""
    import re

    from fprotoseg.model import config_schema

    found: dict[str, set[str]] = {}
    for path in (REPO_ROOT / "model").glob("*.py"):
        text = path.read_text()
        for var, section in SECTION_VARIABLES.items():
            pattern = re.escape(var) + r'(?:\.get\(|\[)"([a-z_0-9]+)"'
            for key in re.findall(r"(?<![\w.\]])" + pattern, text):
                found.setdefault(section, set()).add(key)
    assert found["TrainSection"] and found["Stage2Config"] and found["DataConfig"]
    for section, keys in found.items():
        fields = set(getattr(config_schema, section).model_fields)
        assert keys <= fields, (section, sorted(keys - fields))
