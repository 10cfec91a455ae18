"""Build hook: ship the calibration recipes and export profiles inside the package.

The YAML files stay where users edit them in a checkout (``calibration/``, ``export/``); a built
wheel carries copies as package data under ``edgeq/_data/recipes`` and ``edgeq/_data/profiles``,
which :mod:`edgeq.config` finds through :mod:`importlib.resources`. Everything else is in
pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
#: top-level folder in the checkout → folder under edgeq/_data in the package
DATA_DIRS = {"calibration": "recipes", "export": "profiles"}


class BuildPyWithData(build_py):
    """``build_py`` that also copies ``calibration/*.yaml`` and ``export/*.yaml`` into the package."""

    def run(self) -> None:
        super().run()
        for src, dst in DATA_DIRS.items():
            target = Path(self.build_lib) / "edgeq" / "_data" / dst
            self.mkpath(str(target))
            for path in sorted((ROOT / src).glob("*.yaml")):
                self.copy_file(str(path), str(target / path.name))


setup(cmdclass={"build_py": BuildPyWithData})
