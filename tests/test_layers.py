"""Imports go one way: app -> worker -> model; within the worker, service -> wsi; the API never
loads torch. Checked on the source (AST), so a wrong import fails here before it fails a deploy.

Rules (an import anywhere in a file counts, lazy ones inside functions included, except where
noted):
- everything imports the installed names (``fprotoseg.app``...), never bare ``app``/``worker``/``model``;
- model imports neither worker nor app; worker never imports app;
- the slide pipeline (worker/wsi) never imports the job service (worker/service);
- app imports no torch, OpenSlide, tiffslide, OpenCV or numpy at module level (only inside the
  CLI handlers that run the pipeline), and importing the API app leaves torch out of sys.modules;
- the model package has no import loop;
- the model's three rooms: the inference API (the top of model/) never imports model/training;
  a network (model/networks) imports no training module, nor a module of the API that does.
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


def _module_name(path: Path, root: Path = REPO_ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["fprotoseg", *parts])


def _imports(path: Path, root: Path = REPO_ROOT) -> Iterator[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
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


TRAINING = "fprotoseg.model.training"
NETWORKS = "fprotoseg.model.networks"


def _model_graph(root: Path = REPO_ROOT) -> dict[str, set[str]]:
    """Module -> the modules of fprotoseg.model it imports (lazy imports included; a name imported
    from a package counts as the package, ``from fprotoseg.model import load_segmenter`` as
    ``fprotoseg.model``)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((root / "model").rglob("*.py")):
        name = _module_name(path, root)
        graph[name] = {m for m, _, _ in _imports(path, root) if _under(m, "fprotoseg.model") and m != name}
    nodes = set(graph)
    for deps in graph.values():
        deps &= nodes
    return graph


def _reaches(graph: dict[str, set[str]], start: str, target: str) -> list[str] | None:
    """The first import chain from ``start`` to a module under ``target``, or None."""
    stack, seen = [[start]], {start}
    while stack:
        trail = stack.pop()
        for nxt in sorted(graph.get(trail[-1], ())):
            if _under(nxt, target):
                return [*trail, nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append([*trail, nxt])
    return None


def _room(module: str) -> str:
    if _under(module, TRAINING):
        return "training"
    return "networks" if _under(module, NETWORKS) else "api"


def _chains_into_training(room: str, root: Path = REPO_ROOT) -> list[str]:
    """Each module of ``room`` whose imports (straight, or through other modules) reach training."""
    graph = _model_graph(root)
    return [
        " -> ".join(chain)
        for module in sorted(graph)
        if _room(module) == room and (chain := _reaches(graph, module, TRAINING))
    ]


def test_the_inference_api_never_imports_training() -> None:
    """What the worker and the API load to segment a slide is the top of fprotoseg.model and the
    networks: neither may pull in the trainers, the datasets or their training-only libraries."""
    assert _chains_into_training("api") == []


def test_networks_import_no_training() -> None:
    """A network is rebuilt by the inference API from a manifest and trained by the trainers: it
    sits below both, so no import of it, straight or through a module of the API, reaches training."""
    assert _chains_into_training("networks") == []


def test_the_rooms_rule_follows_chains_through_the_api(tmp_path: Path) -> None:
    """A network that imports an API module that imports training is caught, and so is that API
    module: files written here, since the real tree has no such chain."""
    files = {
        "model/__init__.py": "",
        "model/leaf.py": "def helper() -> None:\n    from fprotoseg.model.training.train import run\n",
        "model/networks/__init__.py": "",
        "model/networks/net.py": "from fprotoseg.model.leaf import helper\n",
        "model/networks/clean.py": "from fprotoseg.model import errors\n",
        "model/training/__init__.py": "",
        "model/training/train.py": "from fprotoseg.model.networks.net import helper\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert _chains_into_training("networks", tmp_path) == [
        "fprotoseg.model.networks.net -> fprotoseg.model.leaf -> fprotoseg.model.training.train"
    ]
    assert _chains_into_training("api", tmp_path) == [
        "fprotoseg.model.leaf -> fprotoseg.model.training.train"
    ]


def test_the_model_package_has_no_import_loop() -> None:
    graph = {name: deps - {"fprotoseg.model"} for name, deps in _model_graph().items()}

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
