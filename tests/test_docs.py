"""The documents a newcomer reads first stay true: the module tree lists every module, and the
README stays short enough to read."""

from __future__ import annotations

import re

from tests.conftest import REPO_ROOT


def test_the_architecture_tree_lists_every_module() -> None:
    text = (REPO_ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"\b([a-z_0-9]+\.py)\b", text))
    modules = {
        p.name
        for layer in ("app", "worker", "model")
        for p in (REPO_ROOT / layer).rglob("*.py")
        if p.name != "__init__.py"
    }
    assert modules - listed == set()
    tree = text[text.index("```\napp/") : text.index("```", text.index("```\napp/") + 3)]
    in_tree = set(re.findall(r"\b([a-z_0-9]+\.py)\b", tree))
    assert in_tree - modules == set()  # no module the code does not have


def test_the_readme_is_short() -> None:
    assert len((REPO_ROOT / "README.md").read_text().splitlines()) <= 230
