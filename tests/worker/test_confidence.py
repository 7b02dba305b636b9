"""Per-class low-confidence areas in stats.json, on a real slide, with a network whose scores have
a known softmax: the channel stub's one-hot scores times a gain. One-hot x 1 gives the chosen class
e / (e + 2) = 0.58 (below the 0.6 cut: all of every class is "low"); x 20 gives e²⁰ / (e²⁰ + 2) ≈ 1
(none is, but where the bilinear sampling mixes two classes' scores at their boundaries)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from fprotoseg.worker.wsi.confidence import LOW_CONFIDENCE
from fprotoseg.worker.wsi.pipeline import PipelineOptions, run
from tests.stubs import ChannelStubSegmenter


@dataclass
class GainStub(ChannelStubSegmenter):
    gain: float = 1.0

    def predict(self, tiles_nhwc_uint8: np.ndarray) -> np.ndarray:
        return super().predict(tiles_nhwc_uint8) * np.float32(self.gain)


@pytest.mark.parametrize("gain", [1.0, 20.0])
def test_low_confidence_area_per_class(tmp_path, shared_data, gain):
    p_chosen = math.exp(gain) / (math.exp(gain) + 2)
    result = run(
        shared_data / "slides/CMU-1-Small-Region.svs", tmp_path / "out", GainStub(gain=gain),
        options=PipelineOptions(batch_size=8),
    )
    confidence = result.stats["confidence"]
    assert confidence["threshold"] == LOW_CONFIDENCE
    by_name = {c["name"]: c for c in confidence["classes"]}
    scored = [c for c in result.stats["classes"] if c["area_um2"] > 0]
    assert scored
    for entry in scored:
        low = by_name[entry["name"]]
        assert low["low_confidence_fraction"] == low["low_confidence_area_um2"] / entry["area_um2"]
        if p_chosen < LOW_CONFIDENCE:  # every pixel (between classes, sampled scores mix: lower still)
            assert low["low_confidence_area_um2"] == entry["area_um2"]
        else:  # only where two classes' scores are sampled together, near their boundaries
            assert low["low_confidence_fraction"] < 0.25
