"""The OpenAPI schema against the real server: schemathesis' own ``st run`` CLI, bounded in time,
against a ``fprotoseg serve`` on 127.0.0.1, every check on but one. It must find nothing.

Left out: ``positive_data_acceptance`` ("a schema-valid request was rejected"). Any bytes are a valid
``format: binary`` file part, but only whole-slide images are accepted (a PNG is ``415
unsupported_format``, documented); no JSON schema can say "is a slide".

Told to schemathesis: ``413`` rejects invalid data too. A JSON body over 16 KiB (an over-long
``callback_url`` of a megabyte, say) is refused with ``413`` before it is parsed; schemathesis'
own list of rejections leaves 413 out."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.app.live import API_KEY, api_server

MAX_TIME_S = 90
# schemathesis' default statuses for "invalid data was rejected", and 413
REJECTIONS = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]


@pytest.mark.slow
def test_schemathesis_finds_nothing(tmp_path: Path, tiny_checkpoint: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    with api_server(
        tmp_path / "data",
        tiny_checkpoint,
        tmp_path / "serve.log",
        FPROTOSEG_MIN_FREE_MB="0",
        FPROTOSEG_MAX_UPLOAD_MB="4",
    ) as url:
        config = tmp_path / "schemathesis.toml"
        config.write_text(f"[checks.negative_data_rejection]\nexpected-statuses = {json.dumps(REJECTIONS)}\n")
        run = subprocess.run(
            [
                st,
                "--config-file",
                str(config),
                "run",
                f"{url}/openapi.json",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance",
                "--max-time",
                str(MAX_TIME_S),
                "--max-examples",
                "40",
                "--workers",
                "1",
                "--seed",
                "11",
                "--header",
                f"X-API-Key: {API_KEY}",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=MAX_TIME_S + 120,
            check=False,
        )
    out = run.stdout + run.stderr
    summary = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)|requests|failures", line)]
    print("\n".join(summary[-12:]))
    assert run.returncode == 0, out[-6000:]
    assert "Internal server error" not in out
