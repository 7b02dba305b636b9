"""Settings: the contract's environment names, safe defaults, one-line configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from fprotoseg.model.errors import ConfigurationError
from fprotoseg.worker.service.settings import Settings, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("FPROTOSEG_"):
            monkeypatch.delenv(name)


def test_contract_names_are_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FPROTOSEG_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FPROTOSEG_BROKER_URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("FPROTOSEG_API_KEYS", " alpha, beta ,,")
    monkeypatch.setenv("FPROTOSEG_AUTH_DISABLED", "false")
    monkeypatch.setenv("FPROTOSEG_MAX_UPLOAD_MB", "12.5")
    monkeypatch.setenv("FPROTOSEG_CHECKPOINT", str(tmp_path / "m.safetensors"))
    monkeypatch.setenv("FPROTOSEG_CALLBACK_SECRET", "s3cret")
    s = Settings()
    assert s.data_dir == tmp_path
    assert s.broker_url == "redis://127.0.0.1:6379/3" and not s.embedded
    assert s.api_keys == ["alpha", "beta"]
    assert s.auth_disabled is False
    assert s.max_upload_bytes == int(12.5 * 1024 * 1024)
    assert s.checkpoint == tmp_path / "m.safetensors"
    assert s.callback_secret == "s3cret"
    assert s.result_dir("j1") == tmp_path / "jobs" / "j1" / "results"


def test_defaults_are_safe() -> None:
    s = Settings()
    assert s.embedded and s.broker_url is None
    assert s.auth_disabled is False and s.api_keys == []  # closed, not open
    assert s.checkpoint is None  # packaged default model
    assert s.visibility_timeout_s > s.job_hard_time_limit_s > s.job_soft_time_limit_s
    assert s.worker_concurrency == 1 and s.host == "127.0.0.1"


def test_blank_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FPROTOSEG_BROKER_URL", "")
    monkeypatch.setenv("FPROTOSEG_CHECKPOINT", "")
    monkeypatch.setenv("FPROTOSEG_API_KEYS", "")
    s = Settings()
    assert s.broker_url is None and s.checkpoint is None and s.api_keys == []


@pytest.mark.parametrize(
    ("name", "value", "mentions"),
    [
        ("FPROTOSEG_BROKER_URL", "amqp://localhost", "BROKER_URL"),
        ("FPROTOSEG_VISIBILITY_TIMEOUT_S", "10", "VISIBILITY_TIMEOUT"),
        ("FPROTOSEG_MAX_UPLOAD_MB", "-1", "MAX_UPLOAD_MB"),
        ("FPROTOSEG_DEVICE", "tpu", "DEVICE"),
        ("FPROTOSEG_PORT", "99999", "PORT"),
    ],
)
def test_bad_values_give_one_line_errors_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, mentions: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as info:
        load_settings()
    assert mentions in info.value.message and "\n" not in info.value.message


def test_cli_reports_a_bad_setting_without_traceback(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "FPROTOSEG_BROKER_URL": "amqp://x", "FPROTOSEG_DATA_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-m", "fprotoseg.app.cli", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("fprotoseg: error:") and "Traceback" not in out.stderr
    assert "FPROTOSEG_BROKER_URL" in out.stderr
