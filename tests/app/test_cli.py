"""The command line registers every subcommand module, and a missing one fails loudly.

A wheel that left out a subcommand module used to give a CLI without that subcommand (the import
error was taken for "not built yet"); now it is an import error at start-up, naming the module.
"""

from __future__ import annotations

import subprocess
import sys

from fprotoseg.app.cli import COMMAND_MODULES, build_parser
from tests.conftest import REPO_ROOT


def test_every_command_module_is_registered() -> None:
    on_disk = {p.stem for p in (REPO_ROOT / "app" / "commands").glob("*.py") if p.stem != "__init__"}
    assert set(COMMAND_MODULES) == on_disk
    help_text = build_parser().format_help()
    assert all(name in help_text for name in COMMAND_MODULES)


def test_a_subcommand_module_missing_from_the_install_is_an_error() -> None:
    # None in sys.modules: importing the module raises ModuleNotFoundError, as for a file left out
    code = (
        "import sys; sys.modules['fprotoseg.app.commands.pseudo'] = None\n"
        "from fprotoseg.app.cli import main; main(['--help'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0, proc.stdout
    assert "ModuleNotFoundError" in proc.stderr and "fprotoseg.app.commands.pseudo" in proc.stderr
