"""The reports are complete, self-contained, and render in a real browser (headless Chromium)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_OVERRIDES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "screenshot_report.sh"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory, sac_pendulum: Path) -> Path:
    """A Pendulum bundle validated with every part on (small counts)."""
    from edgeq.pipeline import quantize
    from edgeq.validate.validator import ValidationOptions

    out = tmp_path_factory.mktemp("report") / "bundle"
    opts = ValidationOptions(targets=("cpu", "cuda", "trt"), floor_draws=2, sensitivity_levels=(1e-3, 0.1, 1.0),
                             sensitivity_draws=2, latency_calls=500, latency_large_batch=128)
    quantize(sac_pendulum, "Pendulum-v1", out, episodes=4, calib_episodes=4, num_envs=4, validation=opts,
             overrides=QUICK_OVERRIDES)
    return out


def test_html_is_one_self_contained_file(validated: Path) -> None:
    html = (validated / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", html), "report.html must not load external files"
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    # returns, paired, sensitivity, action error, divergence, per-layer, latency
    assert len(images) == 7
    for b64 in images:
        assert base64.b64decode(b64).startswith(PNG_MAGIC)
    val = json.loads((validated / "validation.json").read_text())
    status = val["verdict"]["status"]
    assert f"{status}: int8 vs float on 4 paired episodes" in html
    for section in ("Verdict", "Paired differences and the noise floor", "Sensitivity: the error budget",
                    "Action error", "Trajectory divergence", "Per-layer error", "Latency"):
        assert f"<h2>{section}</h2>" in html
    assert "cuda: not validated" in html  # unavailable targets are said, not hidden (on a machine without them)
    assert not list(validated.glob(".report.tmp-*"))


def test_markdown_links_existing_plots(validated: Path) -> None:
    md = (validated / "report.md").read_text(encoding="utf-8")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 7
    for link in links:
        assert (validated / link).read_bytes().startswith(PNG_MAGIC)
    assert "| cpu |" in md and "## Per-layer error" in md


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="chromium is not installed (apt-get install -y chromium) - cannot screenshot the report")
def test_report_renders_in_headless_chromium(validated: Path, tmp_path: Path) -> None:
    import matplotlib.image

    shot = tmp_path / "report.png"
    subprocess.run(["bash", str(SCRIPT), str(validated / "report.html"), str(shot), "1200,6000"], check=True,
                   timeout=120, capture_output=True)
    img = matplotlib.image.imread(str(shot))[..., :3]
    assert img.shape[:2] == (6000, 1200)
    pixels = np.round(img * 255).astype(int)
    status = json.loads((validated / "validation.json").read_text())["verdict"]["status"]
    banner = np.array({"PASS": [0xE3, 0xF6, 0xE5], "INCONCLUSIVE": [0xFF, 0xF4, 0xD6]}.get(status, [0xFD, 0xE6, 0xE6]))
    top = pixels[:400]
    assert (np.abs(top - banner).sum(axis=2) <= 6).sum() > 5000, "the coloured verdict banner is not on screen"
    non_white = (pixels.sum(axis=2) < 720).mean()
    assert non_white > 0.05, "the page looks blank"
    # plots rendered: the float-policy blue of the matplotlib figures appears on the page
    blue = np.array([0x4C, 0x72, 0xB0])
    assert (np.abs(pixels - blue).sum(axis=2) <= 30).sum() > 200


def test_report_has_saturation_section(tmp_path) -> None:
    from edgeq.validate.report import saturation_section

    targets = {"cpu": {"saturation": {"on_int8_trajectory": {"tensors": {"obs": {"rate": 0.0123}}},
                                      "warnings": ["tensor 'obs': 1.23% outside"]}}}
    sec = saturation_section(targets)
    assert sec is not None and sec.title == "Saturation and robustness"
    tables = [b for kind, b in sec.blocks if kind == "table"]
    assert tables and tables[0][1][0][3:] == ["obs", "1.230%"]
    assert saturation_section({"cpu": {}}) is None
