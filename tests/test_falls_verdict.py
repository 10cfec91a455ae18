"""The BipedalWalker case reproduced: a policy that falls more often after quantization is never PASS.

The RecurrentPPO InvertedPendulum fixture (episodes end when the pole falls) quantized deliberately
coarsely: activations clipped at their 70th percentile, no per-layer search. Measured here
(ONNX Runtime CPU, ``policy.int8.cpu.onnx``): float balances 1000 steps on every seed; clipped at the
75th percentile the INT8 policy dropped the pole in 20 of 20 episodes (-65%), at the 80th it dropped it
late in every episode (returns 910-971, -6.4%) before the CPU file's layer choice changed, at the 83rd
not at all: the loss sits on a cliff, so the test clips at the 70th. The default verdict must not be
PASS, and the failure counts must be printed and recorded.
With the edgeq defaults the same policy keeps the pole up (tests/test_recurrent_ppo.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import QUICK_MEASURE, policy_fixture


@pytest.mark.slow
def test_coarse_quantization_that_falls_is_not_pass(tmp_path: Path) -> None:
    out = tmp_path / "coarse"
    res = subprocess.run(
        [sys.executable, "-m", "edgeq.cli", "quantize", str(policy_fixture("recurrentppo-invertedpendulum")),
         "--env", "InvertedPendulum-v5", "--out", str(out), "--no-auto", "--calibrator", "percentile",
         "--percentile", "70", "--episodes", "10", "--strict", *QUICK_MEASURE],
        capture_output=True, text=True, timeout=900)
    text = " ".join(res.stdout.split())
    assert res.returncode in (1, 3), res.stdout + res.stderr  # FAIL or INCONCLUSIVE, never PASS (0)
    assert "verdict: PASS" not in text
    # the failure counts are in the summary: float never falls, int8 falls
    assert "failures: float 0/10, int8" in text
    val = json.loads((out / "validation.json").read_text())
    cpu = val["targets"]["cpu"]
    assert cpu["int8_model"] == "policy.int8.cpu.onnx"
    assert cpu["float"]["terminations"] == 0
    assert cpu["int8"]["terminations"] >= 5
    assert val["verdict"]["status"] != "PASS"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["decision"]["status"] == val["verdict"]["status"]
