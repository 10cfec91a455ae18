"""One version, written in one place (edgeq/_version.py) and typed (py.typed ships with the package)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

import edgeq
from edgeq._version import __version__

REPO = Path(__file__).resolve().parent.parent


def test_version_has_one_source() -> None:
    assert edgeq.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "edgeq._version.__version__"}
    # no other module writes a version string of its own
    others = [p for p in (REPO / "edgeq").rglob("*.py")
              if p.name != "_version.py" and re.search(r"__version__\s*=", p.read_text())]
    assert others == []


def test_package_is_typed_and_changelog_names_the_version() -> None:
    assert (REPO / "edgeq" / "py.typed").is_file()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["edgeq"]
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## Unreleased" in changelog and f"## {__version__}" in changelog
