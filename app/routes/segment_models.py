"""The request and response shapes of ``POST /segment``: one definition of each field.

A slide arrives two ways: uploaded (``multipart/form-data``, every field a string) or named by
URI (a JSON body, typed values). Both are validated by :class:`SegmentFields` (the form leniently,
so ``"0.5"`` is a number; the JSON strictly, so ``"0.5"`` is not), and both request bodies in the
OpenAPI document are generated from it. Adding a field is one edit here (plus its test); what a
field *means* to a job (a callback URL that may be called, a model that exists) is checked by the
route against the server's settings.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fprotoseg.app.errors import Problem
from fprotoseg.app.problems import validation_detail
from fprotoseg.app.routes.views import JobView
from fprotoseg.app.upload import MAX_FILENAME_CHARS
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.netguard import MAX_URL_CHARS
from fprotoseg.worker.service.states import JobState
from fprotoseg.worker.service.strictjson import StrictJSONError, check_value, control_characters, loads_strict
from fprotoseg.worker.wsi.roi import MAX_ROI_BYTES, parse_roi

__all__ = [
    "MAX_EXTERNAL_ID_CHARS",
    "MAX_METADATA_BYTES",
    "MAX_MPP",
    "MAX_URI_CHARS",
    "MIN_MPP",
    "SEGMENT_REQUEST_BODY",
    "SegmentAccepted",
    "SegmentFields",
    "SegmentReference",
]

MAX_METADATA_BYTES = 4096
MAX_EXTERNAL_ID_CHARS = 200
MAX_MODEL_NAME_CHARS = 100
MAX_URI_CHARS = 2048
MIN_MPP, MAX_MPP = 0.01, 100.0


class SegmentFields(BaseModel):
    """The fields of ``POST /segment`` besides the slide itself."""

    model_config = ConfigDict(extra="forbid")

    mpp: float | None = Field(
        default=None,
        ge=MIN_MPP,
        le=MAX_MPP,
        allow_inf_nan=False,
        description="level-0 µm/px; overrides (or supplies missing) slide metadata",
    )
    callback_url: str | None = Field(
        default=None,
        max_length=MAX_URL_CHARS,
        json_schema_extra={"format": "uri"},
        description="http(s) URL POSTed a signed JSON body when the job finishes; no credentials, no "
        "private address unless FPROTOSEG_CALLBACK_ALLOWED_HOSTS lists it",
    )
    model: str | None = Field(
        default=None,
        max_length=MAX_MODEL_NAME_CHARS,
        description="a model name from GET /models; default: the configured default",
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description=f'a JSON object of the client\'s own (e.g. {{"external_id": "CASE-4711"}}), at most '
        f"{MAX_METADATA_BYTES} bytes; echoed in the job, stats.json, provenance.json and the callback",
    )
    external_id: str | None = Field(
        default=None, max_length=MAX_EXTERNAL_ID_CHARS, description="shorthand for metadata.external_id"
    )
    roi: dict[str, Any] | None = Field(
        default=None,
        description="a region of interest in level-0 pixels: a GeoJSON Polygon or MultiPolygon, a Feature "
        f"or a FeatureCollection as QuPath exports it (at most {MAX_ROI_BYTES // 1024} KiB); only tiles "
        "touching it are inferred, and the outputs and areas are cut to it. A bad one: 422 invalid_roi",
    )

    @field_validator("roi", mode="before")
    @classmethod
    def _roi_checked(cls, value: Any, info: ValidationInfo) -> Any:
        """Parsed and checked as GeoJSON here, kept as one MultiPolygon. A bad ROI raises RoiError
        (no ValueError, so it leaves pydantic as itself: ``422 invalid_roi``, not invalid_request)."""
        if value is None:
            return None
        if isinstance(value, str) and not _is_form(info):
            raise ValueError("roi must be a GeoJSON object, not a string")
        return parse_roi(value).to_geojson()
    qc_policy: Literal["warn", "refuse"] | None = Field(
        default=None,
        description="slide QC: warn (succeed, QC codes as warnings) or refuse (fail with the QC code "
        "before inference); default: the deployment's FPROTOSEG_QC_POLICY",
    )

    outputs: Literal["probabilities"] | None = Field(
        default=None,
        description="optional outputs besides the standard files: probabilities = probabilities.ome.tiff, "
        "a pyramidal OME-TIFF with one uint8 channel per class (probability x 255) at the output µm/px "
        "(GET /jobs/{id}/probabilities.ome.tiff)",
    )

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata_from_form(cls, value: Any, info: ValidationInfo) -> Any:
        """In a form the object arrives as JSON text, capped as sent; a JSON body's string is not one."""
        if not (isinstance(value, str) and _is_form(info)):
            return value
        if len(value.encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        try:
            return loads_strict(value)
        except StrictJSONError as exc:
            raise ValueError(f"metadata is not interoperable JSON (RFC 8259): {exc}") from None
        except ValueError:
            raise ValueError("metadata must be a JSON object") from None

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        """A JSON body's object, capped as it serialises (a form's was capped as sent); either way
        nothing that could not be written back as JSON, no control character but tab and newline."""
        if value is None:
            return value
        try:
            check_value(value, "metadata")
        except StrictJSONError as exc:
            raise ValueError(str(exc)) from None
        if (char := control_characters(value, text_whitespace=True)) is not None:
            raise ValueError(f"metadata holds the control character {char}")
        if not _is_form(info) and len(json.dumps(value).encode()) > MAX_METADATA_BYTES:
            raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
        return value

    @field_validator("external_id", "model")
    @classmethod
    def _no_control_characters(cls, value: str | None) -> str | None:
        """Identifiers are printed in logs and reports: a control character (an ANSI escape, a
        newline) would forge lines there, so it is refused rather than kept."""
        if value is not None and (char := control_characters(value)) is not None:
            raise ValueError(f"holds the control character {char}")
        return value

    @classmethod
    def from_form(cls, form: dict[str, str]) -> SegmentFields:
        """The multipart form's fields (strings; an empty one is absent, an unknown one ignored)."""
        given = {k: v for k, v in form.items() if k in cls.model_fields and v != ""}
        return _validated(cls, given, form=True)

    def client_metadata(self) -> dict[str, Any] | None:
        """The client's metadata, with ``external_id`` merged in when given alone."""
        if not self.external_id:
            return self.metadata
        return {**(self.metadata or {}), "external_id": self.external_id}


class SegmentReference(SegmentFields):
    """The JSON body of ``POST /segment``: a slide named by URI, and the same fields."""

    slide_uri: str = Field(
        min_length=1,
        max_length=MAX_URI_CHARS,
        description="file:///path under FPROTOSEG_SLIDE_ROOTS (read where it is) or s3://bucket/key "
        "(fetched, at most FPROTOSEG_SLIDE_CACHE_MAX_MB)",
    )

    @model_validator(mode="before")
    @classmethod
    def _an_object(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            raise ValueError("the body must be a JSON object with slide_uri")
        return value

    @classmethod
    def from_json(cls, doc: Any) -> SegmentReference:
        """A parsed JSON body, typed strictly (a quoted number is not an mpp)."""
        return _validated(cls, doc, form=False)


def _is_form(info: ValidationInfo) -> bool:
    return bool(info.context and info.context.get("form"))


def _validated(model: type[Any], data: Any, *, form: bool) -> Any:
    """Form values are strings (parsed leniently); JSON values must have their own types."""
    try:
        return model.model_validate(data, strict=not form, context={"form": form})
    except ValidationError as exc:
        raise Problem(ErrorCode.INVALID_REQUEST, validation_detail(exc.errors())) from None


class SegmentAccepted(BaseModel):
    """The ``202`` answer: the job created (or found again) for the slide."""

    job_id: str
    status_url: str
    state: JobState
    job: JobView


def _form_property(schema: dict[str, Any], max_bytes: int = MAX_METADATA_BYTES) -> dict[str, Any]:
    """A field's schema as a form part: the optional's null dropped, an object sent as JSON text."""
    alternatives = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    prop = {**alternatives[0], **{k: v for k, v in schema.items() if k not in ("anyOf", "default", "title")}}
    prop.pop("title", None)
    if prop.get("type") == "object":
        prop = {"type": "string", "maxLength": max_bytes, "description": prop.get("description", "")}
    return prop


def _request_body() -> dict[str, Any]:
    fields = SegmentFields.model_json_schema()["properties"]
    form = {
        "file": {
            "type": "string",
            "format": "binary",
            "description": f"the whole-slide image; its file name (at most {MAX_FILENAME_CHARS} "
            "characters) is kept exactly, as data",
        },
        **{
            name: _form_property(schema, MAX_ROI_BYTES if name == "roi" else MAX_METADATA_BYTES)
            for name, schema in fields.items()
        },
    }
    return {
        "required": True,
        "content": {
            "application/json": {"schema": SegmentReference.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": form}},
        },
    }


# ``openapi_extra`` of the route: both bodies, generated from the models above
SEGMENT_REQUEST_BODY: dict[str, Any] = {"requestBody": _request_body()}
