"""``fprotoseg segment --qc-policy``: the DAPI NDPI through the real CLI process, with the packaged
default model. warn prints the QC code and exits 0; refuse exits with the code's exit status."""

from __future__ import annotations

import json

from fprotoseg.worker.error_codes import ErrorCode
from tests.test_cli_segment import run_cli

DAPI = "slides/test3-DAPI-2-387.ndpi"


def test_dapi_warned_then_refused(tmp_path, shared_data):
    slide = str(shared_data / DAPI)
    warned = run_cli("segment", slide, "--out", str(tmp_path / "warn"), "--no-progress")
    assert warned.returncode == 0, warned.stderr
    assert "not_brightfield_he" in warned.stdout
    qc = json.loads((tmp_path / "warn" / "qc.json").read_text())
    assert qc["verdict"] == "warn" and qc["codes"] == ["not_brightfield_he"]

    refused = run_cli("segment", slide, "--out", str(tmp_path / "refuse"), "--qc-policy", "refuse")
    assert refused.returncode == ErrorCode.NOT_BRIGHTFIELD_HE.exit_code == 65, refused.stderr
    assert "not_brightfield_he" in refused.stderr and "fluorescence" in refused.stderr
    assert not (tmp_path / "refuse" / "stats.json").exists()
