"""edgeq's default settings keep the float return (a light check; the 20-episode study is benchmarks/defaults.py)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import QUICK_MEASURE

import edgeq
import edgeq.quantizers.build  # noqa: F401  (the callable package must survive its submodules being imported)
from edgeq.config import QuantizeConfig


def test_default_quantize_keeps_pendulum_return(sac_pendulum: Path, tmp_path: Path) -> None:
    res = edgeq.quantize(sac_pendulum, "Pendulum-v1", tmp_path / "bundle", episodes=5, seed=0)
    cpu = res.validation["targets"]["cpu"]
    f, q = cpu["float"]["mean"], cpu["int8"]["mean"]
    kept = 1.0 + (q - f) / abs(f)  # reads the same for negative returns
    assert kept >= 0.99, f"int8 kept {100 * kept:.2f}% of the float return ({q:.1f} vs {f:.1f})"
    # the defaults are what the recipe says, and the manifest shows every layer's choice
    rec = QuantizeConfig.from_recipe(None, env="Pendulum-v1").quantization
    quant = res.manifest["quantization"]
    assert quant["settings"]["options"]["auto"] == rec.auto
    assert quant["settings"]["options"]["transform"] == rec.transform
    for layer in quant["layers"]:
        if layer["precision"] == "int8":
            assert layer["choice"]["label"] and 0.0 <= layer["kernel"] <= 1.0
        else:
            assert layer["reason"]  # anything not int8 says why
    m = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert m["quantization"]["metrics"]["heldout_action_error"]["mean"] < 0.2
    # SAC archives carry their Q critic: the plan reports the critic-weighted error and value loss (issue 12 part 2)
    assert "weighted_mean" in m["quantization"]["metrics"]["heldout_action_error"]
    assert abs(m["quantization"]["metrics"]["critic_value_loss"]["relative"]) < 0.05
    assert m["calibration"]["holdout_seeds"]


def test_cli_selects_the_quantization_options(sac_pendulum: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "b"
    res = subprocess.run([sys.executable, "-m", "edgeq.cli", "quantize", str(sac_pendulum), "--env", "Pendulum-v1",
                          "--out", str(out), "--episodes", "2", "--calib-episodes", "4", "--holdout-episodes", "1",
                          "--transform", "equalize", "--alpha", "0.4", "--no-auto", "--rounding", "nearest",
                          "--no-bias-correction", "--fp16-fallback", "0", "--noise", "0.2", "--noise-epsilon", "0.1",
                          *QUICK_MEASURE],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    m = json.loads((out / "manifest.json").read_text())
    opts = m["quantization"]["settings"]["options"]
    assert (opts["transform"], opts["alpha"], opts["auto"], opts["rounding"], opts["bias_correction"],
            opts["fp16_fallback"]) == ("equalize", 0.4, False, "nearest", False, 0)
    assert m["calibration"]["exploration"] == {"gaussian": 0.2, "epsilon": 0.1}
    # the equalization asked for, or AffineQuant's input transform (on by default) learned from it
    assert m["quantization"]["transforms"][0]["method"] in ("equalize", "affinequant")
    assert "per-layer quantization" in res.stdout and "equalize(alpha=0.4)" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "edgeq.cli", "quantize", str(sac_pendulum), "--env", "Pendulum-v1",
                          "--out", str(tmp_path / "c"), "--rounding", "magic"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "rounding must be one of" in bad.stderr and "Traceback" not in bad.stderr
