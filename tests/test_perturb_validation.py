"""Robustness validation end to end on the trained TorchScript LSTM policy (InvertedPendulum-v5, falls).

``edgeq quantize policy.pt --perturb push:...``: float and int8 validated nominally and under the same
seeded pushes, with per-episode ``terminated`` flags, termination rates with Wilson intervals, and
the saturation of each INT8 tensor in both conditions; ``--calib-perturb`` calibrates under pushes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import QUICK_MEASURE, QUICK_PLAN
from typer.testing import CliRunner

from edgeq.cli import app

POLICY = Path(__file__).parent / "fixtures" / "policies" / "torchscript-lstm-invertedpendulum.pt"
PUSH = "push:speed=1.0,interval=40-120"
EPISODES = 8
runner = CliRunner()


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    if not POLICY.exists():
        raise FileNotFoundError(f"{POLICY} is missing: make it with scripts/make_torchscript_fixture.py")
    root = tmp_path_factory.mktemp("robust")
    out = {}
    for name, extra in {"nominal-calib": [], "push-calib": ["--calib-perturb", PUSH]}.items():
        res = runner.invoke(app, ["quantize", str(POLICY), "--env", "InvertedPendulum-v5", "--out", str(root / name),
                                  "--episodes", str(EPISODES), "--calib-episodes", "8", "--perturb", PUSH, *QUICK_PLAN,
                                  *QUICK_MEASURE, *extra])
        assert res.exit_code == 0, res.output
        out[name] = root / name
    return out


def _val(bundle: Path) -> dict:
    return json.loads((bundle / "validation.json").read_text())


def test_validation_reports_both_conditions_with_termination_flags_and_rates(bundles: dict[str, Path]) -> None:
    val = _val(bundles["nominal-calib"])
    assert val["perturbation"] == [{"kind": "push", "speed": 1.0, "interval": [40, 120]}]
    target = val["targets"]["cpu"]
    for cond in (target, target["perturbed"]):
        for precision in ("float", "int8"):
            r = cond[precision]
            assert len(r["terminated"]) == EPISODES and all(isinstance(t, bool) for t in r["terminated"])
            assert r["termination_rate"] == pytest.approx(np.mean(r["terminated"]))
            lo, hi = r["termination_ci95"]
            assert 0.0 <= lo <= r["termination_rate"] <= hi <= 1.0
            # an episode is terminated exactly when it ended before the 1000-step limit
            assert r["terminated"] == [n < 1000 for n in r["lengths"]]
        assert "termination_difference" in cond and "saturation" in cond
    # the trained policy balances nominally; the pushes knock it over in some episodes
    assert target["float"]["termination_rate"] == 0.0
    assert target["perturbed"]["float"]["termination_rate"] > 0.0
    assert target["perturbed"]["float"]["mean"] < target["float"]["mean"]


def test_pushes_drive_tensors_outside_nominal_calibration_and_push_calibration_covers_them(
        bundles: dict[str, Path]) -> None:
    nominal = _val(bundles["nominal-calib"])["targets"]["cpu"]
    pushed = _val(bundles["push-calib"])["targets"]["cpu"]
    sat_nominal_calib = nominal["perturbed"]["saturation"]["on_float_trajectory"]["max_rate"]
    sat_push_calib = pushed["perturbed"]["saturation"]["on_float_trajectory"]["max_rate"]
    # the float trajectories under pushes are the same in both bundles (same seeds, same pushes)
    assert nominal["perturbed"]["float"]["returns"] == pushed["perturbed"]["float"]["returns"]
    assert sat_nominal_calib > nominal["saturation"]["on_float_trajectory"]["max_rate"]
    assert sat_push_calib < sat_nominal_calib
    manifest = json.loads((bundles["push-calib"] / "manifest.json").read_text())
    assert manifest["calibration"]["perturbations"] == [{"kind": "push", "speed": 1.0, "interval": [40, 120]}]
    # TorchScript stores no spaces: the bundle takes the env's (InvertedPendulum: one action in [-3, 3])
    assert manifest["action_space"]["low"] == [-3.0] and manifest["action_space"]["high"] == [3.0]
    assert manifest["io"]["state"] == [{"input": "h_in", "output": "h_out", "shape": [1, 64]},
                                       {"input": "c_in", "output": "c_out", "shape": [1, 64]}]
    # the LSTM gates are int8 and calibrated (the previous hidden state has a range)
    gates = manifest["source"]["details"]["recurrent"]["gate_nodes"]
    layers = {layer["node"]: layer["precision"] for layer in manifest["quantization"]["layers"]}
    assert all(layers[g] == "int8" for g in gates)
    assert any(a["tensor"] == "memory.l0.h_prev" for a in manifest["quantization"]["activations"])
