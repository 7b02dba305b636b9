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


def test_outputs_probabilities_through_the_cli(tmp_path, shared_data, tiny_checkpoint):
    """``--outputs probabilities`` writes probabilities.ome.tiff beside the mask; the per-pixel maps
    of the viewer (artefacts.tiff, confidence.tiff) are written either way."""
    import numpy as np
    import tifffile

    slide = str(shared_data / "slides/CMU-1-Small-Region.svs")
    out = tmp_path / "out"
    proc = run_cli("segment", slide, "--out", str(out), "--checkpoint", str(tiny_checkpoint),
                   "--device", "cpu", "--output-mpp", "4", "--outputs", "probabilities", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    with tifffile.TiffFile(out / "probabilities.ome.tiff") as tif:
        assert tif.is_ome and tif.series[0].axes == "CYX"
        probs = tif.series[0].levels[0].asarray()
        assert 'PhysicalSizeX="4.0"' in tif.ome_metadata
        assert all(f'Name="{c["name"]}"' in tif.ome_metadata for c in stats["classes"])
    mask = tifffile.imread(out / "mask.tiff", level=0)
    assert probs.shape == (len(stats["classes"]), *mask.shape)
    assert np.array_equal(probs.max(axis=0), tifffile.imread(out / "confidence.tiff", level=0))
    assert tifffile.imread(out / "artefacts.tiff", level=0).shape == mask.shape
    assert json.loads((out / "provenance.json").read_text())["options"]["write_probabilities"] is True

    bad = run_cli("segment", slide, "--out", str(tmp_path / "bad"), "--outputs", "logits")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "--outputs" in bad.stderr
