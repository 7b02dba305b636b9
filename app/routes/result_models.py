"""The JSON result files as the API documents them: ``stats.json``, ``provenance.json`` and the
GeoJSON FeatureCollection.

Why a module of its own: the worker writes these files as plain dicts (its layer cannot import
the API), and the API serves them as files, unparsed. These models are only their schema in the
OpenAPI document, so a generated client reads ``stats.classes[0].area_um2`` as a typed float
instead of digging in a bare dict. The fields a LIMS keys on are named and typed; every object
also admits further properties, so a field the worker adds later never breaks an older client.
Tests validate the files a real job wrote against these models, so the schema cannot drift.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "FeatureCollectionView",
    "ProvenanceView",
    "StatsView",
]


class _Open(BaseModel):
    """A result object: the named fields typed, any further field kept (newer worker, older client)."""

    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------------------ shared blocks
class ResultJob(_Open):
    """The ``job`` block the service adds to stats.json and provenance.json: the client's case."""

    job_id: str
    filename: str | None = Field(description="the client's file name exactly as sent")
    metadata: dict[str, Any] | None = Field(description="the client's metadata object (e.g. external_id)")
    idempotency_key: str | None
    upload_sha256: str | None
    slide_uri: str | None = Field(default=None, description="file:// or s3:// when named, not uploaded")
    model: str | None = Field(default=None, description="the model the job ran (a name from GET /models)")


class ResultRoi(_Open):
    """The region of interest the job was cut to (level-0 pixels)."""

    coordinates: str = Field(description='always "level-0 pixels"')
    bounds_px: list[float] = Field(description="x0, y0, x1, y1")
    area_um2: float
    geometry: dict[str, Any] | None = Field(
        default=None, description="the ROI as sent (provenance.json only)"
    )


# ------------------------------------------------------------------------------------- stats
class ClassStats(_Open):
    """One class's area (label value ``label`` of mask.tiff)."""

    name: str
    color: list[int] = Field(description="r, g, b (0..255)")
    label: int = Field(description="its value in mask.tiff (1..n; 0 is glass)")
    pixel_count: int = Field(description="label-map pixels at output_mpp")
    area_um2: float
    area_mm2: float
    fraction_of_tissue: float = Field(ge=0, le=1)
    region_count: int = Field(description="connected regions (GeoJSON features) of this class")


class StatsSlide(_Open):
    file: str = Field(description="the client's file name")
    width: int = Field(description="level-0 width in pixels")
    height: int = Field(description="level-0 height in pixels")
    mpp: float | None = Field(description="level-0 µm/px used")
    mpp_source: str | None
    vendor: str | None


class QcSummary(_Open):
    """Slide QC in brief (``GET /jobs/{id}/qc`` has the values and thresholds)."""

    verdict: str = Field(description="pass, warn or refused")
    policy: str = Field(description="warn or refuse")
    codes: list[str] = Field(description="the codes of the checks that failed")
    artefact_area_um2: dict[str, float] = Field(description="artefact kind -> area left out of the scores")
    excluded_area_um2: float


class ClassConfidence(_Open):
    name: str
    low_confidence_area_um2: float
    low_confidence_fraction: float


class ConfidenceSummary(_Open):
    measure: str
    threshold: float
    classes: list[ClassConfidence]


class StatsView(_Open):
    """``stats.json``: per-class areas in µm² and mm², fractions of tissue, region counts."""

    slide: StatsSlide
    output_mpp: float = Field(description="µm/px of mask.tiff and of every pixel count")
    tissue_area_um2: float
    tissue_area_mm2: float
    classes: list[ClassStats] = Field(description="in label order (the order of GET /models)")
    warnings: list[str]
    qc: QcSummary | None = None
    confidence: ConfidenceSummary | None = None
    roi: ResultRoi | None = Field(default=None, description="present when the job had a region of interest")
    job: ResultJob | None = Field(default=None, description="added by the service (absent from the CLI's)")


# -------------------------------------------------------------------------------- provenance
class ProvenanceSlide(_Open):
    file: str | None = Field(default=None, description="the client's file name")
    reader: str
    vendor: str | None
    width_px: int
    height_px: int
    mpp: float | None
    mpp_source: str | None
    level_count: int
    sha256: str
    size_bytes: int


class ProvenanceRead(_Open):
    level: int = Field(description="the slide level tiles were read from")
    level_mpp: float
    level_downsample: float
    mpp: float
    mpp_source: str | None


class ProvenanceClass(_Open):
    name: str
    color: list[int]


class ProvenanceModel(_Open):
    name: str
    checksum_sha256: str | None
    classes: list[ProvenanceClass]
    mpp: float
    tile_size_px: int
    output_stride: int
    device: str
    precision: str


class ProvenanceTissue(_Open):
    mpp: float = Field(description="µm/px the tissue mask was found at")
    saturation_threshold: int = Field(description="HSV saturation (0..255) above which a pixel is tissue")
    area_um2: float


class ProvenanceTiles(_Open):
    grid_rows: int
    grid_cols: int
    grid_total: int
    inferred: int
    skipped_no_tissue: int
    tile_size_px: int
    margin_px: int
    step_px: int


class ProvenanceOutput(_Open):
    mpp: float
    label_map_shape: list[int]
    small_regions_absorbed: int


class ProvenanceView(_Open):
    """``provenance.json``: the slide and how it was read, the model, tiles, timings, software."""

    fprotoseg_version: str
    started_at: str = Field(description="ISO 8601 UTC")
    finished_at: str = Field(description="ISO 8601 UTC")
    slide: ProvenanceSlide
    read: ProvenanceRead
    model: ProvenanceModel
    tissue: ProvenanceTissue
    tiles: ProvenanceTiles
    output: ProvenanceOutput
    options: dict[str, Any] = Field(description="the pipeline options the job ran with")
    timings_s: dict[str, float] = Field(description="stage -> seconds, and total")
    software: dict[str, str] = Field(description="package -> version")
    platform: dict[str, str]
    warnings: list[str]
    roi: ResultRoi | None = None
    job: ResultJob | None = Field(default=None, description="added by the service (absent from the CLI's)")


# ----------------------------------------------------------------------------------- GeoJSON
class Polygon(BaseModel):
    type: Literal["Polygon"]
    coordinates: list[list[list[float]]] = Field(description="rings of [x, y] in level-0 pixels")


class MultiPolygon(BaseModel):
    type: Literal["MultiPolygon"]
    coordinates: list[list[list[list[float]]]] = Field(description="polygons of rings of [x, y]")


class Classification(BaseModel):
    name: str
    color: list[int] = Field(description="r, g, b (0..255)")


class Measurements(_Open):
    area_um2: float


class FeatureProperties(_Open):
    objectType: Literal["annotation"]  # QuPath's own name
    classification: Classification
    measurements: Measurements


class Feature(BaseModel):
    """One connected region of one class, as QuPath imports it."""

    type: Literal["Feature"]
    geometry: Polygon | MultiPolygon = Field(discriminator="type")
    properties: FeatureProperties


class FeatureCollectionView(BaseModel):
    """``segmentation.geojson``: one annotation per connected region, coordinates in level-0 pixels."""

    type: Literal["FeatureCollection"]
    features: list[Feature]
