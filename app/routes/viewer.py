"""``GET /jobs/{id}/view``: a page to look at a result, and the tiles and polygons it loads.

The slide with the classes over it (OpenSeadragon, shipped in ``app/static``; no CDN), pan and zoom
down to the output resolution, a toggle per class and for the polygons, per-class areas and
fractions, the slide QC verdict with two layers (the artefacts QC left out, each in its colour, and
the network's per-pixel confidence on a colour ramp; hidden until toggled), and the job's
provenance summary. Everything shown was rendered by the worker
(``worker/wsi/deepzoom.py``): the API has no OpenSlide and reads only files.

Who may look: a caller with the ``X-API-Key`` header, or anyone holding the signed link from
``GET /jobs/{id}`` (``links.view``, :mod:`fprotoseg.app.viewlink`). The page passes the same token
to its tiles, so it keeps working for the life of the token; it sends no Referer (the token is in
the URL) and runs only its own scripts (Content-Security-Policy).
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Security
from fastapi.responses import FileResponse, HTMLResponse, Response

from fprotoseg.app.auth import api_key_scheme, authenticate
from fprotoseg.app.deps import SettingsDep, StoreDep
from fprotoseg.app.errors import Problem
from fprotoseg.app.routes.jobs import MAX_JOB_ID_CHARS, load_job
from fprotoseg.app.routes.results import geojson_file, published_results
from fprotoseg.app.viewlink import MAX_TOKEN_CHARS, sign_view_token, view_token_valid
from fprotoseg.worker.error_codes import ErrorCode
from fprotoseg.worker.service.jobstore import JobRecord, JobStore
from fprotoseg.worker.service.settings import Settings
from fprotoseg.worker.wsi.result_files import (
    GEOJSON_NAME,
    PROVENANCE_NAME,
    STATS_NAME,
    VIEWER_DIR,
    VIEWER_MANIFEST,
    VIEWER_SLIDE_LAYER,
    VIEWER_TILE_MEDIA_TYPES,
    VIEWER_TILE_PX,
)

router = APIRouter(tags=["viewer"])

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
_LAYER_RE = re.compile(r"^(slide|class_[1-9][0-9]{0,2}|confidence|artefacts)$")
_TILE_RE = re.compile(r"^([0-9]{1,6})_([0-9]{1,6})\.(jpeg|png)$")
# A 1x1 transparent PNG: the answer for a class tile the worker left out because it was empty.
_BLANK_PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360606060000000050001a5f645400000000049454e44ae426082"
)
# The one inline style allowed, by its hash: the <style> OpenSeadragon 6.1.1 adds to the page
# ("@media (hover: none) { .openseadragon-canvas:focus { outline: none !important; } }", its exact
# text); without it the console logs a CSP refusal. Scripts stay 'self' only (tests/app/test_viewer.py
# checks the hash against the shipped library and the console in Chromium).
_OPENSEADRAGON_STYLE_SHA256 = "'sha256-9xTiqzfwFaL2SGb1rmr8gysEwVVjIvqWAgmZgqFqpEE='"
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
    f"style-src 'self' {_OPENSEADRAGON_STYLE_SHA256}; "
    "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'",
}
_TILE_HEADERS = {"Cache-Control": "private, max-age=3600", "Referrer-Policy": "no-referrer"}

Token = Annotated[
    str | None,
    Query(
        max_length=MAX_TOKEN_CHARS, description="the signed link token (links.view), instead of the key"
    ),
]


def _viewable_job(
    request: Request, settings: Settings, store: JobStore, job_id: str, token: str | None, key: str | None
) -> tuple[JobRecord, str]:
    """(the job, the token its page and tiles use), for a key holder or a valid signed link."""
    if token:
        rec = store.get(job_id) if 0 < len(job_id) <= MAX_JOB_ID_CHARS else None
        if rec is None or not view_token_valid(settings, token, job_id, rec.tenant):
            raise Problem(
                ErrorCode.VIEW_LINK_INVALID,
                "this view link is invalid or has expired; GET /jobs/{id} with the API key gives a new one",
            )
    else:
        rec = load_job(store, job_id, authenticate(request, key))
        token = sign_view_token(settings, rec.id, rec.tenant)
    if not (published_results(settings, rec, "the viewer exists") / VIEWER_MANIFEST).is_file():
        raise Problem(
            ErrorCode.VIEWER_MISSING,
            f"job {job_id} has no viewer (it finished before the viewer existed); submit the slide again",
        )
    return rec, token


def _read_json(path: Path) -> dict[str, Any]:
    value = json.loads(path.read_text(encoding="utf-8"))
    return value if isinstance(value, dict) else {}


def _summary(rec: JobRecord, provenance: dict[str, Any]) -> list[tuple[str, str]]:
    """The provenance a reviewer checks first, as (label, value) rows."""
    slide, read = provenance.get("slide", {}), provenance.get("read", {})
    model, tiles = provenance.get("model", {}), provenance.get("tiles", {})
    output = provenance.get("output", {})

    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, int | float) and math.isfinite(value) else "?"

    rows = [
        ("slide", str(rec.filename or slide.get("file") or "")),
        ("slide sha256", str(slide.get("sha256", ""))[:16] + "…"),
        ("size", f"{slide.get('width_px', '?')} × {slide.get('height_px', '?')} px, "
                 f"{slide.get('vendor', '?')}"),
        ("µm/px", f"{num(read.get('mpp'), '.4f')} ({read.get('mpp_source', '?')})"),
        ("read at", f"level {read.get('level', '?')}, {num(read.get('level_mpp'), '.3f')} µm/px"),
        ("output", f"{num(output.get('mpp'), 'g')} µm/px, label map "
                   f"{' × '.join(str(v) for v in reversed(output.get('label_map_shape', [])))} px"),
        ("model", str(model.get("name", "?"))),
        ("model sha256", str(model.get("checksum_sha256", ""))[:16] + "…"),
        ("model µm/px, tile", f"{num(model.get('mpp'), 'g')} µm/px, {model.get('tile_size_px', '?')} px"),
        ("device", f"{model.get('device', '?')}, {model.get('precision', '?')}"),
        ("tiles", f"{tiles.get('inferred', '?')} inferred of {tiles.get('grid_total', '?')}"),
        ("run", f"{provenance.get('started_at', '?')} → {provenance.get('finished_at', '?')}, "
                f"{num(provenance.get('timings_s', {}).get('total'), '.1f')} s"),
        ("fprotoseg", str(provenance.get("fprotoseg_version", "?"))),
    ]
    if rec.metadata and rec.metadata.get("external_id"):
        rows.insert(0, ("external id", str(rec.metadata["external_id"])))
    rows += [("warning", str(w)) for w in provenance.get("warnings", [])]
    return rows


def _qc_section(manifest: dict[str, Any], stats: dict[str, Any]) -> str:
    """The QC verdict and codes, and a toggle with its legend per QC layer (unchecked: the classes
    are what a reviewer looks at first)."""
    esc = html.escape
    qc = stats.get("qc") or {}
    areas = qc.get("artefact_area_um2") or {}
    codes = ", ".join(str(c) for c in qc.get("codes", [])) or "none"
    parts = [f'<p>verdict <b>{esc(str(qc.get("verdict", "?")))}</b>, codes: {esc(codes)}</p>']
    for layer in manifest.get("qc_layers", []):
        name = str(layer["layer"])
        box = f'<input type="checkbox" data-layer="{esc(name)}">'
        if name == "artefacts":
            rows = "".join(
                f'<tr><td><span class="swatch swatch-artefact-{esc(str(e["name"]))}"></span> '
                f'{esc(str(e["name"]).replace("_", " "))}</td>'
                f'<td class="num">{float(areas.get(e["name"], 0.0)) / 1e6:.3f}</td></tr>'
                for e in layer.get("legend", [])
            )
            parts.append(f"<p><label>{box} artefacts QC left out</label></p>"
                         f'<table class="legend"><thead><tr><th>artefact</th><th>mm²</th></tr></thead>'
                         f"<tbody>{rows}</tbody></table>")
        elif name == "confidence":
            cut = float(layer.get("low_confidence", 0.0))
            parts.append(f"<p><label>{box} confidence (probability of the chosen class)</label></p>"
                         '<p class="ramp-box"><span class="ramp"></span><span class="ramp-labels">'
                         f"<span>0</span><span>{cut:g} cut</span><span>1</span></span></p>")
    return "".join(parts)


def _page(rec: JobRecord, token: str, manifest: dict[str, Any], stats: dict[str, Any],
          provenance: dict[str, Any]) -> str:
    esc = html.escape
    by_label = {int(c["label"]): c for c in stats.get("classes", [])}
    rows = []
    for layer in manifest["class_layers"]:
        c = by_label.get(int(layer["label"]), {})
        rows.append(
            f'<tr><td><label><input type="checkbox" checked data-layer="{esc(layer["layer"])}"> '
            f'<span class="swatch swatch-{int(layer["label"])}"></span> '
            f'{esc(str(layer["name"]))}</label></td>'
            f'<td class="num">{float(c.get("area_mm2", 0.0)):.3f}</td>'
            f'<td class="num">{100 * float(c.get("fraction_of_tissue", 0.0)):.1f}%</td>'
            f'<td class="num">{int(c.get("region_count", 0))}</td></tr>'
        )
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _summary(rec, provenance))
    config = {
        "token": token,
        "width_px": manifest["width_px"],
        "height_px": manifest["height_px"],
        "tile_px": manifest.get("tile_px", VIEWER_TILE_PX),
        "levels": manifest["levels"],
        "level0_px_per_viewer_px": manifest["level0_px_per_viewer_px"],
        "slide_layer": manifest.get("slide_layer", VIEWER_SLIDE_LAYER),
        "class_layers": manifest["class_layers"],
        "qc_layers": [{"layer": layer["layer"]} for layer in manifest.get("qc_layers", [])],
    }
    # </script> cannot close the JSON block: "<" is escaped
    config_json = json.dumps(config).replace("<", "\\u003c")
    title = esc(rec.filename or rec.id)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title} — fprotoseg result</title>
<link rel="stylesheet" href="../../static/viewer.css">
<link rel="stylesheet" href="view/classes.css?token={esc(token)}">
</head><body>
<aside>
<h1>{title}</h1>
<p class="muted">job {esc(rec.id)}</p>
<h2>Classes</h2>
<table class="classes"><thead><tr><th>class</th><th>mm²</th><th>of tissue</th><th>regions</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<p>tissue {float(stats.get("tissue_area_mm2", 0.0)):.3f} mm²</p>
<p><label><input type="checkbox" id="polygons" checked> polygons (GeoJSON outlines)</label></p>
<h2>Slide QC</h2>
{_qc_section(manifest, stats)}
<p><label>layer opacity <input type="range" id="opacity" min="0" max="100" value="55"></label></p>
<h2>Provenance</h2>
<table class="provenance">{summary}</table>
<p class="muted">Drag to pan, scroll to zoom (down to {float(stats.get("output_mpp", 0.0)):g} µm/px).</p>
</aside>
<main id="viewer"></main>
<script type="application/json" id="fprotoseg-config">{config_json}</script>
<script src="../../static/openseadragon/openseadragon.min.js"></script>
<script src="../../static/viewer.js"></script>
</body></html>
"""


@router.get(
    "/jobs/{job_id}/view",
    summary="A page to look at the result: the slide with the classes over it (HTML)",
    response_class=HTMLResponse,
    responses={
        200: {"description": "the viewer page", "content": {"text/html": {"schema": {"type": "string"}}}},
        401: {"description": "no key and no valid signed link"},
        404: {"description": "no such job (or another tenant's), or no viewer was rendered"},
        409: {"description": "the job has not succeeded (yet)"},
    },
)
def get_view(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    store: StoreDep,
    token: Token = None,
    key: Annotated[str | None, Security(api_key_scheme)] = None,
) -> HTMLResponse:
    rec, token = _viewable_job(request, settings, store, job_id, token, key)
    result_dir = settings.result_dir(job_id)
    page = _page(
        rec,
        token,
        _read_json(result_dir / VIEWER_MANIFEST),
        _read_json(result_dir / STATS_NAME),
        _read_json(result_dir / PROVENANCE_NAME),
    )
    return HTMLResponse(page, headers=_PAGE_HEADERS)


@router.get("/jobs/{job_id}/view/classes.css", include_in_schema=False)
def get_class_css(
    job_id: str, request: Request, settings: SettingsDep, store: StoreDep, token: Token = None,
    key: Annotated[str | None, Security(api_key_scheme)] = None,
) -> Response:
    """The class swatches' colours (a style sheet, since the page allows no inline styles)."""
    _viewable_job(request, settings, store, job_id, token, key)
    manifest = _read_json(settings.result_dir(job_id) / VIEWER_MANIFEST)
    def rgb(color: list[Any]) -> str:
        return f"rgb({int(color[0])},{int(color[1])},{int(color[2])})"

    css = "".join(f".swatch-{int(c['label'])}{{background:{rgb(c['color'])}}}\n"
                  for c in manifest.get("class_layers", []))
    for layer in manifest.get("qc_layers", []):
        for e in layer.get("legend", []):  # artefact names are the worker's own identifiers
            if re.fullmatch(r"[a-z_]{1,40}", str(e["name"])):
                css += f".swatch-artefact-{e['name']}{{background:{rgb(e['color'])}}}\n"
        if layer.get("ramp"):
            stops = ",".join(f"{rgb(s['color'])} {100 * float(s['at']):g}%" for s in layer["ramp"])
            css += f".ramp{{background:linear-gradient(to right,{stops})}}\n"
    return Response(css, media_type="text/css", headers=_TILE_HEADERS)


@router.get("/jobs/{job_id}/view/polygons", include_in_schema=False)
def get_view_polygons(
    job_id: str, request: Request, settings: SettingsDep, store: StoreDep, token: Token = None,
    key: Annotated[str | None, Security(api_key_scheme)] = None,
) -> FileResponse:
    """The job's GeoJSON for the page's polygon layer (gzip-encoded when the browser accepts it)."""
    _viewable_job(request, settings, store, job_id, token, key)
    return geojson_file(settings.result_dir(job_id) / GEOJSON_NAME, request, _TILE_HEADERS)


@router.get("/jobs/{job_id}/view/{layer}.dzi", include_in_schema=False)
def get_dzi(
    job_id: str, layer: str, request: Request, settings: SettingsDep, store: StoreDep, token: Token = None,
    key: Annotated[str | None, Security(api_key_scheme)] = None,
) -> FileResponse:
    """A layer's Deep Zoom descriptor (for other DZI viewers; the page builds its sources inline)."""
    _viewable_job(request, settings, store, job_id, token, key)
    if not _LAYER_RE.match(layer):
        raise Problem(ErrorCode.NOT_FOUND, f"no viewer layer {layer[:40]!r}")
    path = settings.result_dir(job_id) / VIEWER_DIR / f"{layer}.dzi"
    if not path.is_file():
        raise Problem(ErrorCode.NOT_FOUND, f"no viewer layer {layer!r}")
    return FileResponse(path, media_type="application/xml", headers=_TILE_HEADERS)


@router.get("/jobs/{job_id}/view/{layer}_files/{level}/{tile}", include_in_schema=False)
def get_tile(
    job_id: str, layer: str, level: int, tile: str, request: Request, settings: SettingsDep,
    store: StoreDep, token: Token = None, key: Annotated[str | None, Security(api_key_scheme)] = None,
) -> Response:
    """One Deep Zoom tile; an empty class tile (not written by the worker) is a transparent PNG."""
    _viewable_job(request, settings, store, job_id, token, key)
    match = _TILE_RE.match(tile)
    if not _LAYER_RE.match(layer) or match is None or not 0 <= level <= 40:
        raise Problem(ErrorCode.NOT_FOUND, "no such viewer tile")
    col, row, ext = int(match.group(1)), int(match.group(2)), match.group(3)
    # the path is built from validated integers and names only
    path = settings.result_dir(job_id) / VIEWER_DIR / f"{layer}_files" / str(level) / f"{col}_{row}.{ext}"
    if path.is_file():
        return FileResponse(path, media_type=VIEWER_TILE_MEDIA_TYPES[ext], headers=_TILE_HEADERS)
    manifest = _read_json(settings.result_dir(job_id) / VIEWER_MANIFEST)
    if layer != manifest.get("slide_layer", VIEWER_SLIDE_LAYER) and ext == "png" and _in_pyramid(
        manifest, level, col, row
    ):
        return Response(_BLANK_PNG, media_type="image/png", headers=_TILE_HEADERS)
    raise Problem(ErrorCode.NOT_FOUND, "no such viewer tile")


def _in_pyramid(manifest: dict[str, Any], level: int, col: int, row: int) -> bool:
    levels = int(manifest.get("levels", 0))
    if not 0 <= level < levels:
        return False
    scale = 2 ** (levels - 1 - level)
    width = math.ceil(int(manifest["width_px"]) / scale)
    height = math.ceil(int(manifest["height_px"]) / scale)
    tile_px = int(manifest.get("tile_px", VIEWER_TILE_PX))
    return col < math.ceil(width / tile_px) and row < math.ceil(height / tile_px)
