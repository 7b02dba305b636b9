"""The OpenAPI document as a client generator needs it, built once from the routes.

FastAPI documents every error as ``application/json`` (its validation model) and only the errors
a route lists. The service answers every error as ``application/problem+json`` and can answer
401 on every keyed route, 503 wherever the job store is read, and 404 on every job route; this
module makes the document say exactly that, so a generated client parses what it receives.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from fprotoseg.app.problems import PROBLEM_MEDIA_TYPE
from fprotoseg.app.routes.results import RESULT_MODELS
from fprotoseg.app.routes.views import ProblemView

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}

_DEFAULT_DESCRIPTIONS = {
    401: "missing or wrong X-API-Key",
    404: "no such job (another tenant's job is a 404 too)",
    422: "a parameter or header is out of its documented range",
    503: "job store, broker or storage unavailable (Retry-After says when to try again)",
}


def _problem_content() -> dict[str, Any]:
    return {PROBLEM_MEDIA_TYPE: {"schema": PROBLEM_REF}}


def _operation_names(spec: dict[str, Any]) -> dict[tuple[str, str], str]:
    """(path, method) -> the route function's name, where that name is unique in the API: the
    generated client's method names (``create_segmentation``, ``get_job``) instead of FastAPI's
    ``<name><path>_<method>`` (its default operationId, so the name is that without the suffix)."""
    found: dict[tuple[str, str], str] = {}
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            suffix = re.sub(r"\W", "_", path) + f"_{method}"
            default = str(op.get("operationId", ""))
            if default.endswith(suffix) and len(default) > len(suffix):
                found[(path, method)] = default[: -len(suffix)]
    counts = Counter(found.values())
    return {key: name for key, name in found.items() if counts[name] == 1}


def _component_schemas(models: list[type[BaseModel]]) -> dict[str, Any]:
    """The models (and every model they nest) as component schemas, referenced by name: what the
    routes name in ``$ref`` without a ``response_model`` (a file is served, not a model)."""
    _, top = models_json_schema(
        [(m, "serialization") for m in models], ref_template="#/components/schemas/{model}"
    )
    return dict(top.get("$defs", {}))


def build_openapi(app: FastAPI) -> dict[str, Any]:
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    names = _operation_names(spec)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = ProblemView.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, schema in _component_schemas(list(RESULT_MODELS.values())).items():
        if name in schemas and schemas[name] != schema:
            raise ValueError(f"two OpenAPI schemas are named {name}")  # a model renamed fixes it
        schemas[name] = schema
    for path, item in spec.get("paths", {}).items():
        for method, op in item.items():
            if (path, method) in names:  # create_segmentation, not create_segmentation_segment_post
                op["operationId"] = names[(path, method)]
            responses: dict[str, Any] = op.setdefault("responses", {})
            wanted: set[int] = set()
            if op.get("security"):
                wanted |= {401, 503}
            if "{job_id}" in path:
                wanted.add(404)
            if op.get("parameters") or op.get("requestBody"):
                wanted.add(422)
            for code in sorted(wanted):
                responses.setdefault(str(code), {"description": _DEFAULT_DESCRIPTIONS[code]})
            for key, response in responses.items():
                code = int(key) if key.isdigit() else 0
                if code >= 400:
                    response["content"] = _problem_content()
                    generic = response.get("description") in ("", "Validation Error")
                    if code in _DEFAULT_DESCRIPTIONS and generic:
                        response["description"] = _DEFAULT_DESCRIPTIONS[code]
            if path == "/metrics" and method == "get":
                responses["200"]["content"] = {"text/plain": {"schema": {"type": "string"}}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec


def customise_openapi(app: FastAPI) -> None:
    """Serve :func:`build_openapi`'s document at /openapi.json (built on first request, cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
