"""User-supplied environments: ``--env module:callable``, ``--env-kwargs`` and ``--calib-env``.

The env is :mod:`custom_envs` (beside this file): a pendulum written out as a user would wrap their
own simulator, with a constant wind torque as its own disturbance.
"""

from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from conftest import QUICK_MEASURE, QUICK_PLAN
from typer.testing import CliRunner

from edgeq.cli import app
from edgeq.envs import env_factory

POLICIES = Path(__file__).parent / "fixtures" / "policies"
ENV = "custom_envs:make_windy_pendulum"
runner = CliRunner()


def _quantize(out: Path, *extra: str) -> tuple[int, str]:
    res = runner.invoke(app, ["quantize", str(POLICIES / "sac-pendulum.zip"), "--out", str(out), "--episodes", "4",
                              "--calib-episodes", "4", "--num-envs", "4", *QUICK_PLAN, *QUICK_MEASURE,
                              # the CPU file's int8 layers by the width rule: the saturation count below needs
                              # quantized tensors there, and the timed choice depends on the CPU and its load
                              "--set", "export.cpu_layer_selection=width", *extra])
    return res.exit_code, res.output


def _amax(bundle: Path) -> dict[str, float]:
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {a["tensor"]: a["amax"] for a in manifest["quantization"]["activations"]}


def test_entry_point_env_matches_the_registered_one() -> None:
    mine, ref = env_factory(ENV, {"wind": 0.0})(), gym.make("Pendulum-v1")
    o1, _ = mine.reset(seed=4)
    o2, _ = ref.reset(seed=4)
    assert np.array_equal(o1, o2)
    assert isinstance(env_factory(ENV, {"wind": 2.0})(), gym.Env)


def test_quantize_calibrates_and_validates_in_user_envs(tmp_path: Path) -> None:
    code, out = _quantize(tmp_path / "nominal", "--env", ENV, "--env-kwargs", '{"wind": 0.0}')
    assert code == 0, out
    code, out = _quantize(tmp_path / "windy-calib", "--env", ENV, "--env-kwargs", '{"wind": 0.0}',
                          "--calib-env", ENV, "--calib-env-kwargs", '{"wind": 1.5}')
    assert code == 0, out
    code, out = _quantize(tmp_path / "windy", "--env", ENV, "--env-kwargs", '{"wind": 1.5}')
    assert code == 0, out

    manifest = json.loads((tmp_path / "windy-calib" / "manifest.json").read_text())
    assert manifest["env"] == {"id": ENV, "kwargs": {"wind": 0.0}}
    assert manifest["calibration"]["env"] == {"id": ENV, "kwargs": {"wind": 1.5}}
    # calibration under wind saw other states than nominal calibration (same seeds): other ranges,
    # and the same ranges as a bundle calibrated in the windy env itself
    assert _amax(tmp_path / "windy-calib") != _amax(tmp_path / "nominal")
    assert _amax(tmp_path / "windy-calib") == _amax(tmp_path / "windy")
    # validation ran in --env (nominal): identical float returns whatever the calibration env
    val = {b: json.loads((tmp_path / b / "validation.json").read_text())["targets"]["cpu"]
           for b in ("nominal", "windy-calib", "windy")}
    assert val["nominal"]["float"]["returns"] == val["windy-calib"]["float"]["returns"]
    assert val["windy"]["float"]["returns"] != val["nominal"]["float"]["returns"]
    assert "saturation" in val["windy-calib"] and val["windy-calib"]["saturation"]["max_tensor"]


@pytest.mark.parametrize("args,message", [
    (["--env", "custom_envs:no_such_env"], "has no callable"),
    (["--env", "no_such_module_xyz:make"], "cannot import module"),
    (["--env", ENV, "--env-kwargs", "[1, 2]"], "must be a JSON object"),
    (["--env", ENV, "--calib-env-kwargs", "{wind: 1}"], "not valid JSON"),
    (["--env", ENV, "--perturb", "push:speed=1"], "MuJoCo-based env"),
    (["--env", ENV, "--cell-precision", "int4"], "cell precision"),
])
def test_bad_env_options_fail_with_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    code, out = _quantize(tmp_path / "b", *args)
    assert code == 2 and message in " ".join(out.split()), out
    assert not (tmp_path / "b").exists()
