"""The worker tests' fixtures have one definition each (shared ones in tests/worker/conftest.py):
two with the same name in sibling modules drift apart in what they return (``known_slide`` was a
path in one and a (path, truth) tuple in the other), and a test moved between them breaks.

The API tests' ``client``/``server`` fixtures are per-module on purpose (each module configures its
own server), so the rule covers tests/worker, where the fixtures are shared test data.
"""

from __future__ import annotations

import ast
from collections import defaultdict

from tests.conftest import REPO_ROOT


def _is_fixture(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return (isinstance(target, ast.Attribute) and target.attr == "fixture") or (
        isinstance(target, ast.Name) and target.id == "fixture"
    )


def test_every_worker_fixture_is_defined_once() -> None:
    defined: dict[str, list[str]] = defaultdict(list)
    for path in sorted((REPO_ROOT / "tests" / "worker").rglob("*.py")):
        for node in ast.parse(path.read_text(), str(path)).body:
            if isinstance(node, ast.FunctionDef) and any(_is_fixture(d) for d in node.decorator_list):
                defined[node.name].append(str(path.relative_to(REPO_ROOT)))
    twice = {name: where for name, where in defined.items() if len(where) > 1}
    assert not twice, f"fixtures defined more than once: {twice}"
