"""The built wheel works on its own: recipes and profiles inside it, a quantize from another directory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAC_PENDULUM = REPO / "tests" / "fixtures" / "policies" / "sac-pendulum.zip"


def _source_copy(dest: Path) -> Path:
    """The files a wheel is built from (so the build writes nothing into the checkout)."""
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for folder in ("edgeq", "calibration", "export"):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.mark.slow
def test_wheel_installs_and_quantizes_from_elsewhere(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    src = _source_copy(tmp_path / "src")
    dist = tmp_path / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(dist), str(src)], capture_output=True, text=True, env=env, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("edgeq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for shipped in ("edgeq/_data/recipes/default.yaml", "edgeq/_data/recipes/Pendulum-v1.yaml",
                    "edgeq/_data/profiles/cpu-ort.yaml", "edgeq/_data/profiles/jetson-orin.yaml"):
        assert shipped in names
    assert not any(n.startswith(("calibration/", "export/", "tests/")) for n in names)

    # a fresh venv with only the wheel; the heavy dependencies come from this interpreter's site-packages
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                   "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # pip installs the wheel into the venv (pip >= 22.3 --python: no pip needed inside it), no dependencies
    inst = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, env=env, timeout=300)
    assert inst.returncode == 0, inst.stderr
    (purelib / "zz-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import edgeq; print(edgeq.__file__)"],
                           capture_output=True, text=True, env=env, cwd=elsewhere, check=True).stdout.strip()
    assert where.startswith(str(purelib)), where  # the wheel's edgeq, not the checkout's
    out = elsewhere / "bundle"
    res = subprocess.run([str(venv / "bin" / "edgeq"), "quantize", str(SAC_PENDULUM), "--env",
                          "Pendulum-v1", "--out", str(out), "--episodes", "2", "--calib-episodes", "2", "--no-auto",
                          "--quiet"], capture_output=True, text=True, env=env, cwd=elsewhere, timeout=600)
    assert res.returncode == 0, res.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["profile"]["name"] == "cpu-ort"  # the shipped profile
    assert manifest["calibration"]["recipe"]["name"] == "Pendulum-v1"  # the shipped per-env recipe
