"""``GET /models``: the models a job may name (``model=NAME`` in ``POST /segment``).

Read from the checkpoints' manifests (:mod:`fprotoseg.model.catalog`, a header read per file), so
the API lists them without torch; the workers load a model when a job first names it.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from fprotoseg.app.auth import ApiKey
from fprotoseg.app.deps import SettingsDep

router = APIRouter(tags=["models"])


class ModelClass(BaseModel):
    name: str
    color: list[int] = Field(description="[r, g, b] as in the GeoJSON classification")


class ModelDomain(BaseModel):
    organ: list[str] | None = None
    stain: str | None = None
    mpp: float | None = Field(default=None, description="µm/px of the training crops")
    classes: list[str] | None = None


class ModelView(BaseModel):
    name: str = Field(description="what POST /segment takes as model=NAME (the checkpoint's file stem)")
    default: bool = Field(description="used when a job names no model (FPROTOSEG_CHECKPOINT)")
    source: str = Field(description="packaged | models_dir (FPROTOSEG_MODELS_DIR) | configured")
    manifest_name: str | None = Field(description="the name the training run gave the checkpoint")
    architecture: str | None
    classes: list[ModelClass]
    mpp: float | None = Field(description="µm/px the model reads tiles at")
    tile_size_px: int | None
    output_stride: int | None
    metrics: dict[str, Any] = Field(description="the scores recorded in the manifest (held-out mIoU, …)")
    size_bytes: int
    domain: ModelDomain | None = Field(
        default=None,
        description="what the model was trained on (organ, stain, µm/px, classes); slide QC flags a "
        "slide outside it (not_brightfield_he, stain_out_of_range, mpp_outside_model_range)",
    )


class ModelList(BaseModel):
    models: list[ModelView]
    default: str


@router.get("/models", summary="The models a job may name", response_model=ModelList)
def get_models(who: ApiKey, settings: SettingsDep) -> dict[str, Any]:
    from fprotoseg.model.catalog import installed_models

    models, default = installed_models(settings.checkpoint, settings.models_dir)
    return {"models": [m.describe(default) for m in models.values()], "default": default}
