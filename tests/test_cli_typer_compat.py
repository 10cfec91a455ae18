"""The CLI's help patch works with any typer: feature-detected, never read at import when missing.

Typer versions without ``TyperOption.display_type_rich`` (seen on the GPU machine) made ``import
edgeq.cli`` fail with AttributeError, so no command could start there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeq.commands._app import patch_flag_help

ROOT = Path(__file__).resolve().parents[1]


def test_patch_is_skipped_without_the_method_and_applied_with_it() -> None:
    class Old:  # an older/newer typer's option class: no display_type_rich
        is_flag = True

    assert patch_flag_help(Old) is False and not hasattr(Old, "display_type_rich")

    class New:
        def __init__(self, is_flag: bool) -> None:
            self.is_flag = is_flag

        def display_type_rich(self, ctx: Any) -> str:
            return "<bool>" if self.is_flag else "<int>"

    assert patch_flag_help(New) is True
    assert New(True).display_type_rich(None) is None  # a flag shows no value type
    assert New(False).display_type_rich(None) == "<int>"
    assert patch_flag_help(New) is False  # not wrapped twice


def test_cli_help_runs_on_a_typer_without_display_type_rich() -> None:
    code = ("import typer.core as c\n"
            "if hasattr(c.TyperOption, 'display_type_rich'):\n"
            "    del c.TyperOption.display_type_rich\n"
            "from edgeq.cli import main\n"
            "main(['validate', '--help'])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--json" in res.stdout and "--targets" in res.stdout
