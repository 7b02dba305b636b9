"""One registry of error codes: every error class and raise site names a registered code, with the
registry's status and exit code, and the documented table is the registry.

LIMS clients branch on these codes; a code typed at a raise site could drift from the docs and
from the status it answers with, so none is (checked on the source, like tests/test_layers.py).
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator

import pytest

from fprotoseg.model.errors import FprotosegError
from fprotoseg.worker.error_codes import ErrorCode
from tests.conftest import REPO_ROOT

# calls whose code argument is positional or a ``code=`` keyword
_RAISE_CALLS = {"Problem", "problem_response", "fail_job"}


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def _import_error_modules() -> None:
    for package in ("fprotoseg.app", "fprotoseg.worker"):
        importlib.import_module(f"{package}.errors")
    import fprotoseg.model.errors  # noqa: F401 - the root module registers the model's classes


def test_every_error_class_names_a_registered_code_with_its_status_and_exit_code() -> None:
    _import_error_modules()
    checked = 0
    for cls in _subclasses(FprotosegError):
        if not cls.__module__.startswith("fprotoseg.") or "code" not in cls.__dict__:
            continue
        code = ErrorCode(cls.code)
        assert (cls.http_status, cls.exit_code) == (code.http_status, code.exit_code), cls
        checked += 1
    assert checked >= 25


def _sources() -> Iterator[tuple[str, ast.AST]]:
    for layer in ("app", "worker"):
        for path in sorted((REPO_ROOT / layer).rglob("*.py")):
            if path.name != "error_codes.py":
                yield str(path.relative_to(REPO_ROOT)), ast.parse(path.read_text(), str(path))


def _literal_codes(tree: ast.AST) -> Iterator[tuple[int, str]]:
    codes = {c.value for c in ErrorCode}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            candidates = [k.value for k in node.keywords if k.arg == "code"]
            if name in _RAISE_CALLS:
                candidates += node.args
            for arg in candidates:
                if isinstance(arg, ast.Constant) and arg.value in codes:
                    yield node.lineno, arg.value
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            value = node.value
            named_code = any(getattr(t, "id", None) == "code" for t in targets)
            if named_code and isinstance(value, ast.Constant) and isinstance(value.value, str):
                yield node.lineno, value.value
            if isinstance(value, ast.Tuple) and any(getattr(e, "id", None) == "code" for t in targets
                                                    for e in getattr(t, "elts", [])):
                for elt in value.elts:
                    if isinstance(elt, ast.Constant) and elt.value in codes:
                        yield node.lineno, elt.value


def test_no_error_code_is_a_string_literal_in_app_or_worker() -> None:
    found = [f"{path}:{line} {code!r}" for path, tree in _sources() for line, code in _literal_codes(tree)]
    assert found == [], "name the ErrorCode member instead:\n" + "\n".join(found)


def test_the_documented_error_table_is_the_registry() -> None:
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\| `([a-z_0-9]+)` \| (\d+) \| (\d+) \| (.+?) \|$", text, re.MULTILINE)
    documented = {code: (int(status), int(exit_code), hint) for code, status, exit_code, hint in rows}
    registry = {c.value: (c.http_status, c.exit_code, c.hint) for c in ErrorCode}
    assert documented == registry


@pytest.mark.parametrize("code", list(ErrorCode))
def test_a_code_is_its_string_everywhere(code: ErrorCode) -> None:
    import json

    assert code == code.value and f"{code}" == str(code) == code.value
    assert json.dumps({"code": code}) == json.dumps({"code": code.value})

