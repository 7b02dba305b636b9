"""Imports go one way: app -> worker -> model; within the worker, service -> wsi; the API never
loads torch. Checked on the source (AST), so a wrong import fails here before it fails a deploy.

Rules (an import anywhere in a file counts, lazy ones inside functions included, except where
noted):
- everything imports the installed names (``fprotoseg.app``...), never bare ``app``/``worker``/``model``;
- model imports neither worker nor app; worker never imports app;
- the slide pipeline (worker/wsi) never imports the job service (worker/service);
- app imports no torch, OpenSlide, tiffslide, OpenCV or numpy at module level (only inside the
  CLI handlers that run the pipeline), and importing the API app leaves torch out of sys.modules;
- the model package has no import loop.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

LAYERS = ("app", "worker", "model")
HEAVY = ("torch", "openslide", "tiffslide", "cv2", "numpy", "scipy", "shapely", "safetensors")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["fprotoseg", *parts])


def _imports(path: Path) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    guarded = set()  # `if TYPE_CHECKING:` blocks never run
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded.update(id(n) for n in ast.walk(node))
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, id(node) in top_level
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            yield base, node.lineno, id(node) in top_level
            for alias in node.names:  # `from fprotoseg.worker import service` names a module too
                yield f"{base}.{alias.name}", node.lineno, id(node) in top_level


def _sources(layer: str) -> list[Path]:
    return sorted((REPO_ROOT / layer).rglob("*.py"))


def _violations(layer: str, rule) -> list[str]:  # type: ignore[no-untyped-def]
    found = []
    for path in _sources(layer):
        for module, line, at_top in _imports(path):
            reason = rule(path, module, at_top)
            if reason:
                found.append(f"{path.relative_to(REPO_ROOT)}:{line} imports {module} ({reason})")
    return found


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("layer", LAYERS)
def test_only_installed_names_are_imported(layer: str) -> None:
    def rule(path: Path, module: str, at_top: bool) -> str | None:
        bare = module.split(".")[0]
        return "use fprotoseg.<layer>: the distribution installs only `fprotoseg`" if bare in LAYERS else None

    assert _violations(layer, rule) == []


def test_model_imports_neither_worker_nor_app() -> None:
    def rule(path: Path, module: str, at_top: bool) -> str | None:
        if _under(module, "fprotoseg.worker") or _under(module, "fprotoseg.app"):
            return "model is the bottom layer"
        return None

    assert _violations("model", rule) == []


def test_worker_never_imports_app() -> None:
    def rule(path: Path, module: str, at_top: bool) -> str | None:
        return "worker is below app" if _under(module, "fprotoseg.app") else None

    assert _violations("worker", rule) == []


def test_the_slide_pipeline_never_imports_the_job_service() -> None:
    def rule(path: Path, module: str, at_top: bool) -> str | None:
        if "wsi" in path.relative_to(REPO_ROOT).parts and _under(module, "fprotoseg.worker.service"):
            return "wsi turns a slide into files; jobs drive it, not the other way round"
        return None

    assert _violations("worker", rule) == []


def test_app_imports_nothing_heavy_at_module_level() -> None:
    def rule(path: Path, module: str, at_top: bool) -> str | None:
        if at_top and module.split(".")[0] in HEAVY:
            return "the API image has no torch/OpenSlide/numpy: import it inside the CLI handler"
        return None

    assert _violations("app", rule) == []


def test_api_facing_worker_modules_are_light() -> None:
    """What the API imports from the worker (settings, states, store, links, result names, the
    sniffer, errors) must not pull heavy libraries at module level either."""
    light = [
        REPO_ROOT / "worker" / f
        for f in (
            "__init__.py",
            "errors.py",
            "error_codes.py",
            "service/__init__.py",
            "service/settings.py",
            "service/states.py",
            "service/jobstore/__init__.py",
            "service/jobstore/base.py",
            "service/jobstore/sqlite.py",
            "service/jobstore/redis.py",
            "service/callbacks.py",
            "service/celery_app.py",
            "wsi/__init__.py",
            "wsi/result_files.py",
            "wsi/validate.py",
        )
    ]
    found = [
        f"{p.relative_to(REPO_ROOT)}:{line} imports {m}"
        for p in light
        for m, line, at_top in _imports(p)
        if at_top and m.split(".")[0] in HEAVY
    ]
    assert found == []


def test_the_model_package_has_no_import_loop() -> None:
    graph: dict[str, set[str]] = {}
    for path in _sources("model"):
        name = _module_name(path)
        graph[name] = {
            m
            for m, _, _ in _imports(path)
            if _under(m, "fprotoseg.model") and m != "fprotoseg.model" and m != name
        }
    nodes = set(graph)
    for deps in graph.values():
        deps &= nodes

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, trail = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return [*trail, start]
                if nxt not in trail:
                    stack.append((nxt, [*trail, nxt]))
        return None

    loops = [c for c in (cycle_from(n) for n in sorted(graph)) if c]
    assert loops == [], loops[0]


def test_importing_the_api_app_does_not_load_torch(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FPROTOSEG_")}
    env.update({"FPROTOSEG_DATA_DIR": str(tmp_path), "FPROTOSEG_API_KEYS": "k"})
    probe = (
        "import sys, json\n"
        "from fprotoseg.app.main import create_app\n"
        "import fprotoseg.app.cli, fprotoseg.app.routes.segment, fprotoseg.worker.wsi.validate\n"
        "create_app()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    leaked = sorted({m.split(".")[0] for m in modules} & set(HEAVY))
    assert leaked == [], leaked
